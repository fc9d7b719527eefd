"""Primary attention sinks (StreamingLLM; Gu et al. 2410.10781) and hidden sinks (ACT, 2406.15765).

alpha_k = (1 / (T - k + 1)) sum_{i >= k} A[i, k] (1-based k): the mean attention key k receives from
the queries that can see it. The sink rate Sink_1^eps is, as Gu et al.'s released code computes it,
the share of all heads whose alpha_1 exceeds eps in one sequence, averaged over sequences (not the
threshold of the mean alpha); reference protocol T = 64 counting BOS, eps = 0.3, ~100 sequences.

A replaced head that keeps an exact window of W tokens (sink+window, window+linear, the Liger mix,
PowerAttention's local window) is exact softmax for T <= W, so a sink it had survives by
construction at T = 64 with W = 64. The census therefore measures the rate at
T = max(sink_length, 4 W) for the largest such window among the edits under test, and writes T, W
and the rule into sink_rate.json. The model's own sliding-window layers do not raise T: they are
the model's softmax, and T = 64 keeps the rate comparable with Gu et al.'s.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import Backend

from .mechanisms import Mechanism, Stage
from .patterns import alpha_by_layer, diagonal_by_layer, pattern_stats
from .rundir import write_json, write_parquet


def sink_scan(backend: Backend, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha per sequence (N, L, H, T) and previous-token scores (L, H) from one pass over natural sequences (N, T)."""
    info = backend.info
    stats = pattern_stats(backend, ids, diagonals=(1,))
    windows = [info.window(layer) for layer in range(info.n_layers)]
    return alpha_by_layer(stats, windows, per_sequence=True), diagonal_by_layer(stats, 1)


def sink_rate(alpha_first: torch.Tensor, eps: float = 0.3) -> float:
    """Sink_1^eps in percent from alpha_1 per sequence (N, L, H): in each sequence the share of heads
    with alpha_1 > eps, averaged over sequences (Gu et al.'s code). (L, H) is one sequence."""
    per_sequence = (alpha_first > eps).float().flatten(-2).mean(dim=-1)
    return 100.0 * float(per_sequence.mean())


def hidden_sinks(alpha: torch.Tensor, tokens: list[str], threshold: float = 0.1, first: int = 0,
                 min_queries: int = 16) -> pd.DataFrame:
    """Non-initial positions k > first with alpha_k > threshold, per head: (layer, head, position, token, alpha).

    Keys seen by fewer than `min_queries` queries are skipped (a departure from ACT's plain rule): a
    previous-token head alone gives alpha_k = 1 / (T - k), which passes 0.1 for the last ten keys.
    `min_queries` must stay above 1 / threshold."""
    if min_queries * threshold <= 1:
        raise ValueError(f"min_queries ({min_queries}) must exceed 1 / threshold ({1 / threshold:.0f})")
    n_layers, n_heads, n_keys = alpha.shape
    last = n_keys - min_queries
    rows = []
    hits = (alpha[:, :, first + 1:last + 1] > threshold).nonzero().tolist()
    for layer, head, offset in hits:
        position = first + 1 + offset
        rows.append({"layer": layer, "head": head, "position": position, "token": tokens[position],
                     "alpha": float(alpha[layer, head, position])})
    return pd.DataFrame(rows, columns=["layer", "head", "position", "token", "alpha"])


def hidden_sink_summary(events: pd.DataFrame, n_layers: int, n_heads: int) -> pd.DataFrame:
    """Per head: how many hidden sinks, the largest alpha among them, and their tokens."""
    index = pd.MultiIndex.from_product([range(n_layers), range(n_heads)], names=["layer", "head"])
    if events.empty:
        out = pd.DataFrame(index=index).reset_index()
        return out.assign(hidden_sink_count=0, hidden_sink_max=0.0, hidden_sink_tokens="")
    grouped = events.groupby(["layer", "head"])
    summary = pd.DataFrame({
        "hidden_sink_count": grouped.size(),
        "hidden_sink_max": grouped["alpha"].max(),
        "hidden_sink_tokens": grouped["token"].agg(lambda t: " ".join(sorted(set(map(repr, t))))),
    }).reindex(index)
    summary["hidden_sink_count"] = summary["hidden_sink_count"].fillna(0).astype(int)
    summary["hidden_sink_max"] = summary["hidden_sink_max"].fillna(0.0)
    summary["hidden_sink_tokens"] = summary["hidden_sink_tokens"].fillna("")
    return summary.reset_index()


WINDOW_FACTOR = 4  # T is at least this many times the largest exact window of a replaced head


def exact_window(kernel) -> int | None:
    """The exact-softmax window of a replacement kernel (a mix's exact part included), None when it keeps none."""
    if kernel is None:
        return None
    window = getattr(kernel, "window", None)
    return window if isinstance(window, int) else exact_window(getattr(kernel, "exact", None))


def sink_length(requested: int, backend: Backend) -> tuple[int, int | None]:
    """(T, W): the sink-rate length for the edits under test and the largest exact window W among them."""
    windows = [w for edit in backend.standing if (w := exact_window(edit.kernel)) is not None]
    largest = max(windows, default=None)
    return (requested if largest is None else max(requested, WINDOW_FACTOR * largest)), largest


# ---- census declarations ----------------------------------------------------------------------

def sinks_stage(census) -> None:
    """Sink rate with and without BOS; alpha_1 and previous-token scores per head (BOS as the run uses it)."""
    c, info = census.config, census.info
    eps = c.thresholds["sink"]
    rates, first = {}, {}
    length, window = sink_length(c.sink_length, census.backend)
    if info.max_context and length > info.max_context:
        raise AttnprobeError(f"the sink rate needs T = {WINDOW_FACTOR} x the replaced heads' exact window of {window} = {length} "
                             f"tokens, beyond the model's window of {info.max_context}: replace with a smaller window or skip sinks")
    if length != c.sink_length:
        census.note(f"sink rate: replaced heads keep an exact window of {window} tokens, so T = {WINDOW_FACTOR} x {window} "
                    f"= {length}, not {c.sink_length} (within the window a sink survives by construction)")
    for label, bos in (("with_bos", True), ("without_bos", False)):
        if bos and info.bos_id is None:
            continue
        ids = census.natural(c.sink_sequences, length, bos, what="sink rate")
        alpha, previous = sink_scan(census.backend, ids)
        rates[label] = sink_rate(alpha[..., 0], eps)  # thresholded per sequence, then averaged
        first[label] = (alpha[..., 0].mean(dim=0), previous)
    alpha_first, previous = first["with_bos" if census.bos else "without_bos"]
    write_json(census.run / "sink_rate.json", {"T": length, "T_requested": c.sink_length, "exact_window": window,
                                               "T_rule": f"max(sink_length, {WINDOW_FACTOR} x the largest exact window of a replaced head)",
                                               "eps": eps, "n_sequences": ids.shape[0],
                                               "bos_used_for_heads": census.bos, **rates})
    write_parquet(census.run.shard("sinks.parquet"), census.per_head({"alpha_1": alpha_first, "prev_token_score": previous}))


def hidden_sinks_stage(census) -> None:
    """Hidden-sink events on the prose prefills (sinks.parquet) and their per-head summary."""
    c, info = census.config, census.info
    ids, tokens = census.prose_inputs
    events = []
    for sequence in range(ids.shape[0]):
        alpha = sink_scan(census.backend, ids[sequence:sequence + 1])[0][0]
        events.append(hidden_sinks(alpha, tokens[sequence], c.hidden_threshold, 0, c.hidden_min_queries).assign(sequence=sequence))
    events = pd.concat(events, ignore_index=True)
    summary = hidden_sink_summary(events, info.n_layers, info.n_heads)
    summary["hidden_sink_count"] = summary["hidden_sink_count"] / ids.shape[0]  # per sequence
    write_parquet(census.run / "sinks.parquet", events)
    write_parquet(census.run.shard("hidden.parquet"), summary)


def _sink_rate_line(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> str | None:
    path = run_dir / "sink_rate.json"
    if not path.exists():
        return None
    rate = json.loads(path.read_text())
    parts = [f"{k.replace('_', ' ')} {rate[k]:.1f} %" for k in ("with_bos", "without_bos") if k in rate]
    return f"Sink_1^{rate['eps']} at T={rate['T']} on {rate['n_sequences']} sequences: " + ", ".join(parts)


def _sink_presence(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> dict:
    rate = json.loads((run_dir / "sink_rate.json").read_text())
    return {"sink_rate": rate["with_bos" if rate["bos_used_for_heads"] else "without_bos"],
            "sinks_present": bool((heads["alpha_1"] > thresholds["sink"]).any())}


CENSUS = (
    Stage("sinks", sinks_stage, order=10, shard="sinks.parquet", columns=("alpha_1", "prev_token_score"), files=("sink_rate.json",),
          description="sink rate and first-token alpha, previous-token scores"),
    Stage("hidden_sinks", hidden_sinks_stage, order=30, shard="hidden.parquet", files=("sinks.parquet",),
          columns=("hidden_sink_count", "hidden_sink_max", "hidden_sink_tokens"), description="hidden (non-initial) sinks"),
    Mechanism("sink", "sinks", "sink rate", column="alpha_1", threshold=0.3, letter="S", rank=60, panel="sink α₁",
              summary=_sink_rate_line, matrix="sinks", matrix_label="sinks", presence=_sink_presence),
    Mechanism("previous_token", "sinks", "previous-token heads", column="prev_token_score", threshold=0.4, letter="P",
              rank=30, panel="prev. token"),
    Mechanism("hidden_sink", "hidden_sinks", "hidden-sink heads", column="hidden_sink_count", letter="H", rank=50,
              panel="hidden sink", panel_column="hidden_sink_max"),
)
