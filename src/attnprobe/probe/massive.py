"""Massive activations (Sun et al. 2402.17762).

In each block output h_l (all tokens, all dims), entry (t, d) is massive if |h| > 100 and
|h| > 1000 * median(|h_l|). The intervention overwrites only those entries, at the first layer where
they appear, with 0 or with their mean over a reference set, and measures perplexity.
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
                      relative: float = 1000.0) -> torch.Tensor:
    """Boolean (B, T, len(dims)): where each input carries a massive value in `dims` at any layer."""
    ids = check_ids(backend.info, ids)
    dims = list(dims)
    found = torch.zeros(ids.shape[0], ids.shape[1], len(dims), dtype=torch.bool)

    def mark(h: torch.Tensor):
        median = h.float().abs().flatten(1).median(dim=1).values[:, None, None]
        found.logical_or_(_is_massive(h[:, :, dims].float(), median, absolute, relative).cpu())

    n_layers = backend.info.n_layers
    backend.run(ids, reads={(layer, Site.RESID_POST): Apply(mark) for layer in range(n_layers)})
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


def massive_intervention(backend: Backend, entries: pd.DataFrame, held_out: torch.Tensor, batch_size: int = 4,
                         skip_first: int = 0) -> pd.DataFrame:
    """Perplexity of held-out windows: original, massive entries zeroed, and set to their mean.

    The entries are those found on each held-out window (at any layer, in the dims the scan found);
    they are overwritten at the first layer where the scan saw massive values. The mean per dim is
    taken over the scan's entries at that layer (the reference set). `skip_first` as in `perplexity`."""
    rows = [{"intervention": "none", "layer": None,
             "perplexity": perplexity(backend, held_out, batch_size=batch_size, skip_first=skip_first)}]
    if entries.empty:
        return pd.DataFrame(rows)
    first = int(entries["layer"].min())
    at_first = entries[entries["layer"] == first]
    dims = sorted(at_first["dim"].unique().tolist())
    means = at_first.groupby("dim")["value"].mean().to_dict()
    for name, fill in (("zero", 0.0), ("mean", means)):
        total_log, rows_seen = 0.0, 0
        for start in range(0, held_out.shape[0], batch_size):
            ids = held_out[start:start + batch_size]
            edit = overwrite_massive(first, dims, massive_positions(backend, ids, dims), fill)
            batch_ppl = perplexity(backend, ids, [edit], skip_first=skip_first)
            total_log += (math.log(batch_ppl) if math.isfinite(batch_ppl) else math.inf) * ids.shape[0]
            rows_seen += ids.shape[0]
        mean_log = total_log / rows_seen  # every row has the same length, so rows weigh equally
        rows.append({"intervention": name, "layer": first, "perplexity": math.exp(mean_log) if math.isfinite(mean_log) else math.inf})
    return pd.DataFrame(rows).assign(dims=" ".join(map(str, dims)))


# ---- census declarations ----------------------------------------------------------------------

def massive_stage(census) -> None:
    c = census.config
    ids, tokens = census.prose_inputs
    layers, entries = massive_scan(census.backend, ids, tokens, c.massive_absolute, c.massive_relative)
    write_parquet(census.run / "massive_layers.parquet", layers)
    write_parquet(census.run / "massive.parquet", entries)


MIN_ROW = 16  # fewer held-out tokens than this make no perplexity worth quoting


def massive_intervention_stage(census) -> None:
    c = census.config
    entries = pd.read_parquet(census.run / "massive.parquet")
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
    table = massive_intervention(census.backend, entries, windows, skip_first=int(census.bos))
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
    dims = massive.groupby("dim")["value"].agg(lambda v: v.abs().max()).sort_values(ascending=False)
    tokens = massive["token"].value_counts().head(4)
    return (f"layers {massive['layer'].min()}-{massive['layer'].max()}, dims "
            + ", ".join(f"{d} (max {v:,.0f})" for d, v in dims.head(4).items())
            + "; tokens " + ", ".join(f"{t!r} x{n}" for t, n in tokens.items()))


def _presence(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> dict:
    massive = _entries(run_dir)
    return {"massive_present": not massive.empty, "massive_max": float(massive["value"].abs().max()) if not massive.empty else 0.0}


CENSUS = (
    Stage("massive", massive_stage, order=40, files=("massive_layers.parquet", "massive.parquet"), description="massive activations in the residual stream"),
    Stage("massive_intervention", massive_intervention_stage, order=60, needs=("massive",), files=("massive_intervention.parquet",),
          description="perplexity with massive activations zeroed or set to their mean"),
    Mechanism("massive", "massive", "massive activations", rank=45, summary=_summary, matrix="massive",
              matrix_label="massive act.", presence=_presence),
)
