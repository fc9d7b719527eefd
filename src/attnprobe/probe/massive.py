"""Massive activations (Sun et al. 2402.17762).

In each block output h_l (all tokens, all dims), entry (t, d) is massive if |h| > 100 and
|h| > 1000 * median(|h_l|). The scan runs over `massive_sequences` (default 64) windows of census text,
so that a dim carried by few inputs is still found. massive_dims.parquet says per dim the layer where it
first appears anywhere (and in what share of the sequences), and its onset: the first layer at which it
is massive in at least half of the sequences that ever carry it. A dim can flicker early in a few inputs
long before it settles (SmolLM2's dim 507: near 940 at layer 2 in 2 of 64 windows, about 22,700 from
layer 11 in all 64), and its onset, not its rarest early sighting, is where it enters the stream.

The intervention overwrites only massive entries, each dim at its own onset layer (every dim found, not
only those of the earliest layer) where it is massive at that layer, with 0 or with its mean, and measures
held-out perplexity. Entries a dim gains only at later layers are left as the model computes them from the
edited stream (Gemma-3's dim 400 is massive at layer 0 on BOS and a few delimiters, and from layer 1 on most
tokens). "mean" is, per dim, the mean of that dim's massive values at its onset layer over the scan's
sequences: it restores the entry's typical, input-independent size and removes only how it varies between
inputs (Sun et al.: perplexity barely moves, so the entries act as fixed biases), while "zero" removes the
entry altogether.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.model import check_ids
from attnprobe.hooks.edits import Edit
from attnprobe.hooks.reducers import Apply
from attnprobe.hooks.sites import Site

from .census import token_strings
from .mechanisms import Mechanism, Stage
from . import texts
from .perplexity import perplexity
from .rundir import write_parquet


def _is_massive(h: torch.Tensor, median: torch.Tensor, absolute: float, relative: float) -> torch.Tensor:
    magnitude = h.abs()
    return (magnitude > absolute) & (magnitude > relative * median)


def massive_scan(backend: Backend, ids: torch.Tensor, tokens: Sequence[Sequence[str]], absolute: float = 100.0,
                 relative: float = 1000.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per layer (top1..3, median) and every massive entry (layer, sequence, position, token, dim, value, median, ratio)."""
    n_layers = backend.info.n_layers

    def summarise(h: torch.Tensor):
        h = h.float()
        magnitude = h.abs().flatten(1)
        median = magnitude.median(dim=1).values  # one median per sequence
        top = magnitude.topk(3, dim=1).values
        hits = _is_massive(h, median[:, None, None], absolute, relative).nonzero().tolist()
        return median.cpu(), top.cpu(), [(b, t, d, float(h[b, t, d]), float(median[b])) for b, t, d in hits]

    readers = {layer: Apply(summarise) for layer in range(n_layers)}
    backend.run(ids, reads={(layer, Site.RESID_POST): r for layer, r in readers.items()})
    layer_rows, entries = [], []
    for layer, reader in readers.items():
        median, top, hits = reader.result()[0]
        layer_rows.append({"layer": layer, "top1": float(top[:, 0].mean()), "top2": float(top[:, 1].mean()),
                           "top3": float(top[:, 2].mean()), "median": float(median.mean())})
        for b, t, d, value, med in hits:
            entries.append({"layer": layer, "sequence": b, "position": t, "token": tokens[b][t], "dim": d,
                            "value": value, "median": med, "ratio": abs(value) / max(med, 1e-12)})
    columns = ["layer", "sequence", "position", "token", "dim", "value", "median", "ratio"]
    return pd.DataFrame(layer_rows), pd.DataFrame(entries, columns=columns)


def massive_positions(backend: Backend, ids: torch.Tensor, dims: Sequence[int], absolute: float = 100.0,
                      relative: float = 1000.0, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Boolean (B, T, len(dims)): where each input carries a massive value in `dims` at any layer (or, with
    `layers`, dim i at layer layers[i] only)."""
    ids = check_ids(backend.info, ids)
    dims = list(dims)
    found = torch.zeros(ids.shape[0], ids.shape[1], len(dims), dtype=torch.bool)
    at = torch.tensor(list(layers)) if layers is not None else None

    def mark(layer: int):
        def fn(h: torch.Tensor):
            median = h.float().abs().flatten(1).median(dim=1).values[:, None, None]
            hits = _is_massive(h[:, :, dims].float(), median, absolute, relative).cpu()
            found.logical_or_(hits if at is None else hits & (at == layer))
        return fn

    read = range(backend.info.n_layers) if layers is None else sorted(set(layers))
    backend.run(ids, reads={(layer, Site.RESID_POST): Apply(mark(layer)) for layer in read})
    return found


def overwrite_massive(layer: int, dims: Sequence[int], where: torch.Tensor, fill: dict[int, float] | float = 0.0) -> Edit:
    """Overwrite block `layer`'s output at the massive entries `where` (B, T, len(dims)) with 0 or a value per dim."""
    dims = list(dims)

    def fn(h, call):
        h = h.clone()
        for index, dim in enumerate(dims):
            value = fill if isinstance(fill, (int, float)) else fill[dim]
            hit = where[:, : h.shape[1], index].to(h.device)
            h[:, :, dim] = torch.where(hit, torch.as_tensor(value, dtype=h.dtype), h[:, :, dim])
        return h

    return Edit(layer, Site.RESID_POST, fn, f"massive overwrite L{layer} dims {dims}")


MEAN_MEANING = "each dim's mean massive value at its onset layer over the scan (restores its typical size)"
ONSET_SHARE = 0.5  # a dim's onset: the first layer where it is massive in at least this share of the sequences carrying it


def first_layers(entries: pd.DataFrame, n_sequences: int) -> pd.DataFrame:
    """Per massive dim: the layer where it first appears and the share of the scan's sequences in which it is
    massive there; its onset layer (the first where it is massive in at least ONSET_SHARE of the sequences that
    ever carry it), that share of all sequences, its mean value there (the intervention's "mean"); and its
    largest |value| anywhere."""
    rows = []
    for dim, group in entries.groupby("dim"):
        carriers = group["sequence"].nunique()
        per_layer = group.groupby("layer")["sequence"].nunique().sort_index()
        layer = int(per_layer.index[0])
        onset = int(per_layer[per_layer >= ONSET_SHARE * carriers].index[0])
        at_onset = group[group["layer"] == onset]
        rows.append({"dim": int(dim), "first_layer": layer, "sequence_share": per_layer.iloc[0] / n_sequences,
                     "onset_layer": onset, "onset_share": per_layer[onset] / n_sequences,
                     "positions": " ".join(map(str, sorted(at_onset["position"].unique())[:8])),
                     "mean_at_onset": float(at_onset["value"].mean()), "max_abs": float(group["value"].abs().max())})
    columns = ["dim", "first_layer", "sequence_share", "onset_layer", "onset_share", "positions", "mean_at_onset", "max_abs"]
    return pd.DataFrame(rows, columns=columns).sort_values(["onset_layer", "dim"], ignore_index=True)


def massive_edits(backend: Backend, ids: torch.Tensor, dims: pd.DataFrame, fill: str) -> list[Edit]:
    """Edits overwriting each dim of `dims` (a `first_layers` table) at its onset layer, where `ids` carry a
    massive value in it at that layer, with 0 (fill "zero") or its mean ("mean")."""
    where = massive_positions(backend, ids, dims["dim"].tolist(), layers=dims["onset_layer"].tolist())
    edits = []
    for layer, group in dims.groupby("onset_layer"):
        index = [dims.index.get_loc(i) for i in group.index]
        values = 0.0 if fill == "zero" else dict(zip(group["dim"].astype(int), group["mean_at_onset"]))
        edits.append(overwrite_massive(int(layer), group["dim"].astype(int).tolist(), where[:, :, index], values))
    return edits


def massive_intervention(backend: Backend, dims: pd.DataFrame, held_out: torch.Tensor, batch_size: int = 4,
                         skip_first: int = 0) -> pd.DataFrame:
    """Perplexity of held-out windows: original, every massive dim zeroed at its onset layer, and set to its mean.

    The entries overwritten are those each held-out window carries at the dim's onset layer;
    `skip_first` as in `perplexity`."""
    rows = [{"intervention": "none", "layer": None, "fill": "",
             "perplexity": perplexity(backend, held_out, batch_size=batch_size, skip_first=skip_first)}]
    if dims.empty:
        return pd.DataFrame(rows)
    dims = dims.reset_index(drop=True)
    for name in ("zero", "mean"):
        total_log, rows_seen = 0.0, 0
        for start in range(0, held_out.shape[0], batch_size):
            ids = held_out[start:start + batch_size]
            batch_ppl = perplexity(backend, ids, massive_edits(backend, ids, dims, name), skip_first=skip_first)
            total_log += (math.log(batch_ppl) if math.isfinite(batch_ppl) else math.inf) * ids.shape[0]
            rows_seen += ids.shape[0]
        mean_log = total_log / rows_seen  # every row has the same length, so rows weigh equally
        rows.append({"intervention": name, "layer": int(dims["onset_layer"].min()), "fill": "0" if name == "zero" else MEAN_MEANING,
                     "perplexity": math.exp(mean_log) if math.isfinite(mean_log) else math.inf})
    return pd.DataFrame(rows).assign(dims=" ".join(str(d) for d in sorted(dims["dim"])),
                                     dim_layers=" ".join(f"{r.dim}:{r.onset_layer}" for r in dims.sort_values("dim").itertuples()))


# ---- census declarations ----------------------------------------------------------------------

def massive_stage(census) -> None:
    """The scan over `massive_sequences` windows of census text (massive.parquet, massive_layers.parquet) and
    each dim's first and onset layers and frequencies (massive_dims.parquet)."""
    c = census.config
    ids = census.natural(c.massive_sequences, c.massive_length, census.bos, seed_offset=2, what="massive activations")
    layers, entries = massive_scan(census.backend, ids, token_strings(census.model.tokenizer, ids), c.massive_absolute,
                                   c.massive_relative)
    write_parquet(census.run / "massive_layers.parquet", layers.assign(sequences=ids.shape[0]))
    write_parquet(census.run / "massive.parquet", entries)
    write_parquet(census.run / "massive_dims.parquet", first_layers(entries, ids.shape[0]))


MIN_ROW = 16  # fewer held-out tokens than this make no perplexity worth quoting


def massive_intervention_stage(census) -> None:
    c = census.config
    dims = pd.read_parquet(census.run / "massive_dims.parquet")
    held = texts.held_out_ids(census.model.tokenizer, c.perplexity_tokens, path=c.texts, fewer_ok=True)
    length = c.perplexity_length
    if len(held) + census.bos < length:  # a short text: one shorter row, said, rather than no stage at all
        if len(held) < MIN_ROW:
            census.note(f"massive intervention skipped: the text's perplexity range holds {len(held)} tokens, fewer "
                        f"than {MIN_ROW}; pass a longer --texts to measure it")
            write_parquet(census.run / "massive_intervention.parquet",
                          pd.DataFrame(columns=["intervention", "layer", "perplexity"]))
            return
        length = len(held) + census.bos
        census.note(f"massive intervention: the text's perplexity range holds {len(held)} tokens, so one row of {length} "
                    f"was scored, not rows of {c.perplexity_length} (its perplexities compare only with rows of {length})")
    elif len(held) < c.perplexity_tokens:
        census.note(f"massive intervention: the text holds {len(held)} held-out tokens, so {len(held)} were used, "
                    f"not {c.perplexity_tokens}")
    windows = texts.windows(held, length, census.info.bos_id if census.bos else None)
    table = massive_intervention(census.backend, dims, windows, skip_first=int(census.bos))
    write_parquet(census.run / "massive_intervention.parquet", table)


def _entries(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "massive.parquet"
    return pd.read_parquet(path) if path.exists() else None


def _summary(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> str | None:
    massive = _entries(run_dir)
    if massive is None:
        return None
    if massive.empty:
        return "none found"
    dims = pd.read_parquet(run_dir / "massive_dims.parquet").sort_values("max_abs", ascending=False)
    tokens = massive["token"].value_counts().head(4)
    return ("dims " + ", ".join(f"{r.dim} (from layer {r.onset_layer} in {100 * r.onset_share:.0f} % of sequences"
                                + (f", first seen at layer {r.first_layer} in {100 * r.sequence_share:.0f} %"
                                   if r.first_layer != r.onset_layer else "") + f", max {r.max_abs:,.0f})"
                                for r in dims.head(6).itertuples())
            + "; tokens " + ", ".join(f"{t!r} x{n}" for t, n in tokens.items()))


def _presence(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> dict:
    massive = _entries(run_dir)
    return {"massive_present": not massive.empty, "massive_max": float(massive["value"].abs().max()) if not massive.empty else 0.0}


CENSUS = (
    Stage("massive", massive_stage, order=40, files=("massive_layers.parquet", "massive.parquet", "massive_dims.parquet"),
          description="massive activations in the residual stream, each dim's first and onset layers and frequencies"),
    Stage("massive_intervention", massive_intervention_stage, order=60, needs=("massive",), files=("massive_intervention.parquet",),
          description="perplexity with every massive dim zeroed, or set to its mean, at its onset layer"),
    Mechanism("massive", "massive", "massive activations", rank=45, summary=_summary, matrix="massive",
              matrix_label="massive act.", presence=_presence),
)
