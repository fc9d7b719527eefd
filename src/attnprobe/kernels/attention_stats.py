"""Attention statistics from q, k and the row log-sum-exp, without the T x T pattern (torch reference).

Softmax probabilities are `A[i, j] = exp(scaling * q_i . k_j - lse_i)` on the keys query i may see
(causal, and within `window` in a sliding layer). With `lse` in hand:
  - first-token mass A[i, 0], a diagonal A[i, i - off] and the argmax key of a few rows are O(T)
    dot products;
  - column sums sum_i A[i, k] (the numerator of alpha_k) need one tiled pass over the pairs.
This module is the slow, obviously-correct version (query chunks, O(chunk x S) memory); the Triton
kernel in `triton_stats.py` computes the same numbers with O(T) memory.

Shapes: q (B, H, T, d) and k (B, H, S, d) with k already repeated for GQA; the T queries sit at
the last T positions of the S keys (T == S for a prefill).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import allowed_keys

CHUNK_ELEMENTS = 1 << 24  # score elements per query chunk (64 MB in fp32)


@dataclass
class AttentionStats:
    """Per-head statistics of one layer's causal softmax pattern.

    lse (B,H,T); column_sum (B,H,S); first_token (B,H,T) = A[i, 0]; diagonal[off] (B,H) = mean of
    A[i, i - off] over queries at positions >= max(off, diagonal_start); argmax (B,H,R) key index for
    each requested query position (None when no rows were asked for).
    """

    lse: torch.Tensor
    column_sum: torch.Tensor
    first_token: torch.Tensor
    diagonal: dict[int, torch.Tensor] = field(default_factory=dict)
    argmax: torch.Tensor | None = None


def query_positions(n_queries: int, n_keys: int, device) -> torch.Tensor:
    return torch.arange(n_keys - n_queries, n_keys, device=device)


def _chunk_rows(q: torch.Tensor, n_keys: int) -> int:
    batch, heads = q.shape[:2]
    return max(1, CHUNK_ELEMENTS // max(1, batch * heads * n_keys))


def _masked_scores(q_chunk, k, rows, scaling, window):
    scores = torch.matmul(q_chunk.float(), k.float().transpose(-1, -2)) * scaling
    return scores.masked_fill(~allowed_keys(rows, k.shape[2], window), float("-inf"))


def log_sum_exp(q: torch.Tensor, k: torch.Tensor, scaling: float, window: int | None = None) -> torch.Tensor:
    """Row log-sum-exp of the masked scores, (B, H, T) fp32 (natural log, as SDPA returns it)."""
    positions = query_positions(q.shape[2], k.shape[2], q.device)
    step = _chunk_rows(q, k.shape[2])
    parts = [torch.logsumexp(_masked_scores(q[:, :, s:s + step], k, positions[s:s + step], scaling, window), dim=-1)
             for s in range(0, q.shape[2], step)]
    return torch.cat(parts, dim=-1)


def column_sums(q, k, lse, scaling: float, window: int | None = None) -> torch.Tensor:
    """sum_i A[i, k] for every key, (B, H, S) fp32."""
    positions = query_positions(q.shape[2], k.shape[2], q.device)
    step = _chunk_rows(q, k.shape[2])
    total = torch.zeros(*q.shape[:2], k.shape[2], device=q.device)
    for s in range(0, q.shape[2], step):
        scores = _masked_scores(q[:, :, s:s + step], k, positions[s:s + step], scaling, window)
        total += torch.exp(scores - lse[:, :, s:s + step, None].float()).sum(dim=2)
    return total


def _entries(q, k, lse, scaling, key_index, positions, window):
    """A[i, key_index[i]] for each query i (0 where the key is masked); key_index is (T,)."""
    keys = k.float()[:, :, key_index.clamp(min=0)]
    score = (q.float() * keys).sum(-1) * scaling
    visible = (key_index >= 0) & (key_index <= positions)
    if window is not None:
        visible &= (positions - key_index) < window
    return torch.where(visible, torch.exp(score - lse.float()), torch.zeros_like(score))


def first_token_mass(q, k, lse, scaling: float, window: int | None = None) -> torch.Tensor:
    """A[i, 0] for every query, (B, H, T)."""
    positions = query_positions(q.shape[2], k.shape[2], q.device)
    return _entries(q, k, lse, scaling, torch.zeros_like(positions), positions, window)


def diagonal_means(q, k, lse, scaling: float, offsets=(), start: int = 0, window: int | None = None) -> dict[int, torch.Tensor]:
    """{off: (B, H) mean of A[i, i - off] over query positions i >= max(off, start)}; offsets no query reaches are left out."""
    positions = query_positions(q.shape[2], k.shape[2], q.device)
    means = {}
    for off in offsets:
        keep = positions >= max(off, start)
        if not bool(keep.any()):
            continue
        entries = _entries(q[:, :, keep], k, lse[:, :, keep], scaling, positions[keep] - off, positions[keep], window)
        means[off] = entries.mean(dim=-1)
    return means


def argmax_keys(q, k, scaling: float, rows, window: int | None = None) -> torch.Tensor:
    """Argmax key of each requested query position, (B, H, R); argmax of the scores is argmax of A."""
    rows = torch.as_tensor(rows, device=q.device).long()
    positions = query_positions(q.shape[2], k.shape[2], q.device)
    index = rows - int(positions[0])
    return _masked_scores(q[:, :, index], k, rows, scaling, window).argmax(dim=-1)


def reference_stats(q, k, scaling: float, window: int | None = None, lse=None, diagonals=(),
                    argmax_rows=None, diagonal_start: int = 0) -> AttentionStats:
    """Every statistic with torch alone (any device)."""
    lse = log_sum_exp(q, k, scaling, window) if lse is None else lse.float()
    return AttentionStats(
        lse=lse,
        column_sum=column_sums(q, k, lse, scaling, window),
        first_token=first_token_mass(q, k, lse, scaling, window),
        diagonal=diagonal_means(q, k, lse, scaling, diagonals, diagonal_start, window),
        argmax=None if argmax_rows is None else argmax_keys(q, k, scaling, argmax_rows, window),
    )
