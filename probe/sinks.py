"""Primary attention sinks (StreamingLLM; Gu et al. 2410.10781) and hidden sinks (ACT, 2406.15765).

alpha_k = (1 / (T - k + 1)) sum_{i >= k} A[i, k] (1-based k): the mean attention key k receives from
the queries that can see it. The sink rate Sink_1^eps is the percentage of all heads whose alpha_1
(averaged over sequences) exceeds eps; reference protocol T = 64, eps = 0.3, ~100 sequences.
"""
from __future__ import annotations

import pandas as pd
import torch

from attnprobe.hooks.backend import Backend

from .patterns import alpha_by_layer, diagonal_by_layer, pattern_stats


def with_bos(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos_id, dtype=ids.dtype), ids], dim=1)


def sink_scan(backend: Backend, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha (L, H, T) and previous-token scores (L, H) from one pass over natural sequences (N, T)."""
    info = backend.info
    stats = pattern_stats(backend, ids, diagonals=(1,))
    windows = [info.window(layer) for layer in range(info.n_layers)]
    return alpha_by_layer(stats, windows), diagonal_by_layer(stats, 1)


def sink_rate(alpha_first: torch.Tensor, eps: float = 0.3) -> float:
    """Percentage of heads (all layers) whose first-token alpha exceeds eps."""
    return 100.0 * float((alpha_first > eps).float().mean())


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
