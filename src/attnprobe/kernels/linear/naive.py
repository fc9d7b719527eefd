"""Linear attention as Katharopoulos et al. (2020) write it, the reference of every feature map:

    A[t, s] = phi(q_t) . phi(k_s) / sum_{s' <= t} phi(q_t) . phi(k_s')   for s <= t,   z = A v.
"""
from __future__ import annotations

import torch

from ..base import allowed_keys, safe_ratio


def linear_weights(phi_q: torch.Tensor, phi_k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A (B, H, R, S) of query features at positions `rows` over key features 0..S-1."""
    weights = (phi_q @ phi_k.transpose(-1, -2)) * allowed_keys(rows.to(phi_q.device), phi_k.shape[2])
    return safe_ratio(weights, weights.sum(-1))


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z (B, H, T, d_v) for T query features at the last T of the S key positions."""
    rows = torch.arange(phi_k.shape[2] - phi_q.shape[2], phi_k.shape[2], device=phi_q.device)
    return linear_weights(phi_q, phi_k, rows) @ v
