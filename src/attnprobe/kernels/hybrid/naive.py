"""Token hybrids as StreamingLLM (Xiao et al. 2023) and LoLCATs (Zhang et al. 2024) define them.

For query t and key s <= t, with f = sigmoid(window logit) per head and m_t the row maximum of the
exact scores:
    exact   t - s < window, or s < sinks                          weight  f * exp(scaling q_t . k_s - m_t)
    linear  otherwise (only with a feature map)                   weight  (1 - f) * phi(q_t) . phi(k_s)
    A[t, s] = weight(t, s) / sum_{s'} weight(t, s')               (one shared denominator)
Without a feature map, f drops out and A is softmax restricted to the sinks and the window.
"""
from __future__ import annotations

import torch

from ..base import safe_ratio


def hybrid_weights(q, k, scaling: float, rows: torch.Tensor, window: int, sinks: int,
                   phi_q=None, phi_k=None, share=None) -> torch.Tensor:
    """A (B, H, R, S) of queries at positions `rows` over keys 0..S-1; phi_q/phi_k/share (H,) for the linear term."""
    rows = rows.to(q.device)
    k_pos = torch.arange(k.shape[2], device=q.device)
    offset = rows[:, None] - k_pos[None, :]
    visible = offset >= 0
    exact = visible & ((offset < window) | (k_pos < sinks)[None, :])
    scores = ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~exact, float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # the diagonal is always exact
    if phi_q is not None:
        f = share[None, :, None, None]
        weights = f * weights + (1 - f) * (phi_q @ phi_k.transpose(-1, -2)) * (visible & ~exact)
    return safe_ratio(weights, weights.sum(-1))
