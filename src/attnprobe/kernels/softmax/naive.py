"""Causal softmax attention as Vaswani et al. write it: A = softmax(scaling * q k^T + causal mask), z = A v."""
from __future__ import annotations

import torch

from ..base import allowed_keys


def softmax_weights(q: torch.Tensor, k: torch.Tensor, scaling: float, rows: torch.Tensor) -> torch.Tensor:
    """A (B, H, R, S) of queries at positions `rows` over keys 0..S-1."""
    scores = (q @ k.transpose(-1, -2)) * scaling
    return torch.softmax(scores.masked_fill(~allowed_keys(rows.to(q.device), k.shape[2]), float("-inf")), dim=-1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """z (B, H, T, d_v) for the T queries at the last T of the S key positions."""
    rows = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=q.device)
    return softmax_weights(q, k, scaling, rows) @ v
