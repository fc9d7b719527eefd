"""Linear attention with a scalar decay per head, as RetNet (Sun et al. 2023, arXiv 2307.08621), Lightning
Attention-2 and Mamba-2's SSD write it:

    S_t = gamma_t S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,
    A[t, s] = (prod_{i = s+1..t} gamma_i) q_t . k_s       (s <= t; RetNet: gamma fixed, A = (Q K^T) * D).

gamma (B, H, S) per key position (a constant per head for RetNet); normalized, A's rows are divided by their sums.
"""
from __future__ import annotations

import torch

from ..base import allowed_keys, safe_ratio


def decay_weights(q, k, log_gamma, rows: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """A (B, H, R, S) of queries at positions `rows` over keys 0..S-1."""
    rows = rows.to(q.device)
    total = log_gamma.cumsum(dim=2)
    log_decay = (total[:, :, rows, None] - total[:, :, None, :]).masked_fill(~allowed_keys(rows, k.shape[2]), float("-inf"))
    weights = (q @ k.transpose(-1, -2)) * torch.exp(log_decay)
    return safe_ratio(weights, weights.sum(-1)) if normalize else weights
