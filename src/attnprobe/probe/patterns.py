"""One forward pass with PatternStats on every layer: the shared step of the attention-based probes."""
from __future__ import annotations

import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.model import check_ids
from attnprobe.hooks.reducers import PatternStats
from attnprobe.hooks.sites import Site


def pattern_stats(backend: Backend, ids: torch.Tensor, diagonals: tuple[int, ...] = (), diagonal_start: int = 0,
                  batch_size: int = 16) -> list[PatternStats]:
    """Run `ids` (N, T) in batches; return one PatternStats per layer with statistics over all N rows.

    Column sums are kept per sequence (N, H, T); diagonal means are averaged over sequences."""
    ids = check_ids(backend.info, ids)
    n_layers = backend.info.n_layers
    merged: list[PatternStats] = []
    for start in range(0, ids.shape[0], batch_size):
        part = [PatternStats(diagonals, diagonal_start) for _ in range(n_layers)]
        backend.run(ids[start:start + batch_size], reads={(layer, Site.PATTERN): part[layer] for layer in range(n_layers)})
        if not merged:
            merged = part
            continue
        for total, new in zip(merged, part):
            total.column_sum = torch.cat([total.column_sum, new.column_sum])
            for off in diagonals:  # every row has the same length, so per-sequence counts agree
                total._diag_sum[off] = torch.cat([total._diag_sum[off], new._diag_sum[off]])
    return merged


def alpha_by_layer(stats: list[PatternStats], windows: list[int | None], per_sequence: bool = False) -> torch.Tensor:
    """alpha_k for every layer, head and key, averaged over sequences (L, H, T), or per sequence (N, L, H, T)."""
    if per_sequence:
        return torch.stack([s.alpha(w) for s, w in zip(stats, windows)], dim=1)
    return torch.stack([s.alpha(w).mean(dim=0) for s, w in zip(stats, windows)])


def diagonal_by_layer(stats: list[PatternStats], off: int) -> torch.Tensor:
    """Mean attention on the diagonal at offset `off`, averaged over sequences: (L, H)."""
    return torch.stack([s.diagonal(off).mean(dim=0) for s in stats])
