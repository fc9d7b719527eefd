"""The delta rule: DeltaNet (Schlag et al. 2021; Yang et al. 2024, arXiv 2406.06484) and Gated DeltaNet
(Yang et al. 2025, arXiv 2412.06464), on L2-normalised q and k:

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,      o_t = S_t^T q_t      (a_t = 1: DeltaNet)

Unrolled, S_t = sum_{s <= t} G(t, s) k_s u_s^T with G(t, s) = prod_{i = s+1..t} a_i and
u_t = b_t (v_t - sum_{s < t} G(t, s) (k_t . k_s) u_s), i.e. (I + diag(b) L) U = diag(b) V with the
strictly lower L[t, s] = G(t, s) k_t . k_s. So the effective attention is exact:

    A = M (I + diag(b) L)^{-1} diag(b),      M[t, s] = G(t, s) q_t . k_s  (s <= t),      o = A v,

the inverse of a unit lower-triangular matrix (the WY / UT representation of the chunked form).
"""
from __future__ import annotations

import torch

from ..base import allowed_keys


def delta_recurrent(q, k, v, beta, log_alpha) -> torch.Tensor:
    """o (B, H, T, d_v) by the recurrence; beta and log a are (B, H, T)."""
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    outputs = []
    for t in range(q.shape[2]):
        k_t, b_t, a_t = k[:, :, t], beta[:, :, t, None, None], torch.exp(log_alpha[:, :, t])[..., None, None]
        state = a_t * (eye - b_t * k_t[..., :, None] * k_t[..., None, :]) @ state + b_t * k_t[..., :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, :, None] * state).sum(-2))
    return torch.stack(outputs, dim=2)


def delta_weights(q, k, beta, log_alpha, rows: torch.Tensor) -> torch.Tensor:
    """A (B, H, R, S) of queries at positions `rows` over keys 0..S-1, by an explicit matrix inverse."""
    rows = rows.to(q.device)
    n_keys = k.shape[2]
    total = log_alpha.cumsum(dim=2)
    keys = torch.arange(n_keys, device=q.device)
    strictly = allowed_keys(keys, n_keys) & (keys[:, None] != keys[None, :])
    decay = torch.exp((total[..., :, None] - total[..., None, :]).masked_fill(~strictly, float("-inf")))
    lower = (k @ k.transpose(-1, -2)) * decay
    eye = torch.eye(n_keys, dtype=q.dtype, device=q.device)
    w = torch.linalg.inv(eye + beta[..., :, None] * lower) * beta[..., None, :]
    visible = allowed_keys(rows, n_keys)
    m = (q @ k.transpose(-1, -2)) * torch.exp((total[:, :, rows, None] - total[:, :, None, :]).masked_fill(~visible, float("-inf")))
    return m @ w
