"""Cheap head types: previous-token, induction and duplicate-token scores (TransformerLens conventions).

Induction input: random tokens R of length S repeated twice (batch >= 10). The induction score is the
mean attention from position i to i - S + 1 over the second copy; duplicate-token is the mean
attention from i to i - S (the earlier copy of the same token). Previous-token is mean_i A[i, i-1]
on natural text (computed by `sinks.sink_scan`).
"""
from __future__ import annotations

import torch

from attnprobe.hooks.backend import Backend

from .patterns import diagonal_by_layer, pattern_stats
from .sinks import with_bos


def repeated_random_tokens(vocab_size: int, length: int = 50, batch: int = 10, seed: int = 0,
                           bos_id: int | None = None, low: int = 100) -> torch.Tensor:
    """(batch, [1 +] 2 * length) ids: a random string and its exact repeat, optionally after BOS.

    Ids below `low` are avoided: small vocab ids are special or byte tokens in most tokenizers."""
    generator = torch.Generator().manual_seed(seed)
    low = min(low, max(0, vocab_size - 2 * length))
    half = torch.randint(low, vocab_size, (batch, length), generator=generator)
    return with_bos(torch.cat([half, half], dim=1), bos_id)


def induction_scores(backend: Backend, ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(induction, duplicate) scores (L, H) over the second copy of a repeated random string."""
    offset = ids.shape[1] - 2 * length  # 1 when a BOS leads
    stats = pattern_stats(backend, ids, diagonals=(length - 1, length), diagonal_start=offset + length)
    return diagonal_by_layer(stats, length - 1), diagonal_by_layer(stats, length)
