"""Secondary attention sinks (Wong et al. 2512.22213), detected as in their reference code.

1. n_l = ||h_l[first]|| over block outputs; start = the layer after the largest rise of n_l, end = the
   layer of the largest fall after start.
2. In each layer of [start, end): positions j > first with |cos(h_l[j], h_l[first])| > 0.9.
3. Lifetime = number of those layers a token is in; creation = the first. Lifetime >= L - 15 is a
   primary sink, L - 16 >= lifetime >= 5 secondary, shorter noise (thresholds are parameters: the
   paper's models have 40-64 layers).
4. Sink levels: tokens grouped by creation layer (creation layers within one layer of each other merge).
5. Attribution at the creation layer: cosine of the token's MLP output with the first token's residual
   direction, and that output's L2 norm. Sink strength: the attention mass the token receives (alpha_j,
   averaged over heads) at the creation layer, in place of the paper's unpublished sink score.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.model import check_ids
from attnprobe.hooks.reducers import Keep, PatternStats
from attnprobe.hooks.sites import Site

from .mechanisms import Mechanism, Stage
from .rundir import write_parquet

COLUMNS = ["sequence", "position", "token", "creation_layer", "lifetime", "sink_class", "mlp_cos", "mlp_norm",
           "alpha", "level"]


def norm_window(first_norms: torch.Tensor) -> tuple[int, int]:
    """(start, end) layers from the first token's residual norm per layer."""
    rises = first_norms[1:] - first_norms[:-1]
    start = int(rises.argmax()) + 1
    if start >= len(first_norms) - 1:
        return start, len(first_norms)
    falls = first_norms[start + 1:] - first_norms[start:-1]
    end = start + 1 + int(falls.argmin()) if bool((falls < 0).any()) else len(first_norms)
    return start, max(end, start + 1)


def sink_levels(creation_layers: Sequence[int]) -> dict[int, int]:
    """Map each creation layer to a level: distinct layers, merging neighbours one layer apart."""
    levels, level, previous = {}, -1, None
    for layer in sorted(set(creation_layers)):
        if previous is None or layer - previous > 1:
            level += 1
        levels[layer] = level
        previous = layer
    return levels


def secondary_sinks(backend: Backend, ids: torch.Tensor, tokens: Sequence[Sequence[str]], cos_threshold: float = 0.9,
                    primary_min: int | None = None, secondary_min: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sink tokens of each sequence in `ids` (N, T), and the per-sequence BOS-norm window."""
    ids = check_ids(backend.info, ids)
    info = backend.info
    n_layers = info.n_layers
    primary_min = n_layers - 15 if primary_min is None else primary_min
    rows, windows = [], []
    for sequence in range(ids.shape[0]):
        resid = {layer: Keep() for layer in range(n_layers)}
        mlp = {layer: Keep() for layer in range(n_layers)}
        attention = {layer: PatternStats() for layer in range(n_layers)}
        reads = {(layer, Site.RESID_POST): resid[layer] for layer in range(n_layers)}
        reads |= {(layer, Site.MLP_OUT): mlp[layer] for layer in range(n_layers)}
        reads |= {(layer, Site.PATTERN): attention[layer] for layer in range(n_layers)}
        backend.run(ids[sequence:sequence + 1], reads=reads)
        h = torch.stack([resid[layer].result()[0] for layer in range(n_layers)])  # (L, T, D)
        mlp_out = torch.stack([mlp[layer].result()[0] for layer in range(n_layers)])
        first = h[:, 0, :]
        start, end = norm_window(first.norm(dim=-1))
        windows.append({"sequence": sequence, "start": start, "end": end})
        cos = torch.nn.functional.cosine_similarity(h[start:end, 1:, :], first[start:end, None, :], dim=-1).abs()
        member = cos > cos_threshold  # (layers in window, T - 1)
        for j in member.any(dim=0).nonzero().flatten().tolist():
            layers = (member[:, j].nonzero().flatten() + start).tolist()
            creation, lifetime = layers[0], len(layers)
            kind = "primary" if lifetime >= primary_min else "secondary" if lifetime >= secondary_min else "noise"
            position = j + 1
            out = mlp_out[creation, position]
            alpha = attention[creation].alpha(info.window(creation))[0, :, position].mean()
            rows.append({"sequence": sequence, "position": position, "token": tokens[sequence][position],
                         "creation_layer": creation, "lifetime": lifetime, "sink_class": kind,
                         "mlp_cos": float(torch.nn.functional.cosine_similarity(out, first[creation], dim=0)),
                         "mlp_norm": float(out.norm()), "alpha": float(alpha)})
    table = pd.DataFrame(rows, columns=COLUMNS[:-1])
    levels = sink_levels(table.loc[table["sink_class"] != "noise", "creation_layer"].tolist())
    table["level"] = table["creation_layer"].map(levels).fillna(-1).astype(int)
    return table, pd.DataFrame(windows)


def secondary_sinks_stage(census) -> None:
    ids, tokens = census.prose_inputs
    secondary, windows = secondary_sinks(census.backend, ids, tokens)
    write_parquet(census.run / "secondary_sinks.parquet", secondary)
    write_parquet(census.run.shard("prose_windows.parquet"), windows)


def _summary(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> str | None:
    path = run_dir / "secondary_sinks.parquet"
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    counts = table["sink_class"].value_counts()
    return f"{int(counts.get('secondary', 0))} secondary and {int(counts.get('primary', 0))} primary sink tokens"


CENSUS = (
    Stage("secondary_sinks", secondary_sinks_stage, order=50, files=("secondary_sinks.parquet",), description="secondary sinks (cosine to the first token)"),
    Mechanism("secondary_sink", "secondary_sinks", "secondary sinks", rank=55, summary=_summary),
)
