"""Gated linear attention as Yang et al. (2024, arXiv 2312.06635) write it: a per-channel,
data-dependent decay alpha_t in (0, 1]^d of the state,

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t,
    A[t, s] = sum_c q_t[c] k_s[c] prod_{i = s+1..t} alpha_i[c]      (s <= t),      o = A v.

The gates come as log alpha (B, H, S, d), one per key position; queries sit at key positions `rows`.
Normalized (`normalize=True`), A's rows are divided by their sums, which is what the recurrence gives
with a second state n_t = diag(alpha_t) n_{t-1} + k_t and z_t = o_t / (q_t . n_t).
"""
from __future__ import annotations

import torch

from ..base import allowed_keys, safe_ratio


def gla_weights(q, k, log_alpha, rows: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """A (B, H, R, S): the formula above, element by element (O(R S d) memory: tests only)."""
    rows = rows.to(q.device)
    total = log_alpha.cumsum(dim=2)  # log prod_{i <= t} alpha_i
    visible = allowed_keys(rows, k.shape[2])[..., None]
    log_decay = (total[:, :, rows, None, :] - total[:, :, None, :, :]).masked_fill(~visible, float("-inf"))
    weights = torch.einsum("bhrc,bhsc,bhrsc->bhrs", q, k, torch.exp(log_decay))
    return safe_ratio(weights, weights.sum(-1)) if normalize else weights


def gla_recurrent(q, k, v, log_alpha, normalize: bool = False) -> torch.Tensor:
    """z (B, H, T, d_v) by the recurrence, one token at a time."""
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    norm = q.new_zeros(*q.shape[:2], q.shape[-1])
    outputs = []
    for t in range(q.shape[2]):
        alpha = torch.exp(log_alpha[:, :, t])
        state = alpha[..., None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        norm = alpha * norm + k[:, :, t]
        out = (q[:, :, t, :, None] * state).sum(-2)
        outputs.append(safe_ratio(out, (q[:, :, t] * norm).sum(-1)) if normalize else out)
    return torch.stack(outputs, dim=2)
