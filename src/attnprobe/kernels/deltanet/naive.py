"""The delta rule: DeltaNet (Schlag et al. 2021; Yang et al. 2024, arXiv 2406.06484), Gated DeltaNet
(Yang et al. 2025, arXiv 2412.06464) and Kimi Delta Attention (Kimi Linear, arXiv 2510.26692), on
L2-normalised q and k, with a decay a_t that is 1 (DeltaNet), a scalar (Gated DeltaNet) or a vector (KDA):

    S_t = (I - b_t k_t k_t^T) diag(a_t) S_{t-1} + b_t k_t v_t^T,      o_t = S_t^T q_t

(for a scalar a_t this is Gated DeltaNet's a_t (I - b_t k_t k_t^T) S_{t-1} + ...). Unrolled,
S_t = sum_{s <= t} diag(G(t, s)) k_s u_s^T with G(t, s) = prod_{i = s+1..t} a_i and
u_t = b_t (v_t - sum_{s < t} (k_t . G(t, s) k_s) u_s), i.e. (I + diag(b) L) U = diag(b) V with the
strictly lower L[t, s] = k_t . (G(t, s) * k_s). So the effective attention is exact:

    A = M (I + diag(b) L)^{-1} diag(b),      M[t, s] = q_t . (G(t, s) * k_s)  (s <= t),      o = A v,

the inverse of a unit lower-triangular matrix (the WY / UT representation of the chunked form).
"""
from __future__ import annotations

import torch

from ..base import allowed_keys


def delta_recurrent(q, k, v, beta, log_alpha) -> torch.Tensor:
    """o (B, H, T, d_v) by the recurrence; beta (B, H, T), log a (B, H, T, 1) or (B, H, T, d)."""
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    outputs = []
    for t in range(q.shape[2]):
        k_t, b_t = k[:, :, t], beta[:, :, t, None, None]
        decayed = torch.exp(log_alpha[:, :, t])[..., :, None] * state  # diag(a_t) S_{t-1}
        state = (eye - b_t * k_t[..., :, None] * k_t[..., None, :]) @ decayed + b_t * k_t[..., :, None] * v[:, :, t, None, :]
        outputs.append((q[:, :, t, :, None] * state).sum(-2))
    return torch.stack(outputs, dim=2)


def delta_weights(q, k, beta, log_alpha, rows: torch.Tensor) -> torch.Tensor:
    """A (B, H, R, S) of queries at positions `rows` over keys 0..S-1, by an explicit matrix inverse."""
    rows = rows.to(q.device)
    n_keys = k.shape[2]
    total = log_alpha.cumsum(dim=2)  # (B, H, S, 1 or d)
    keys = torch.arange(n_keys, device=q.device)

    def decayed(a, a_rows, mask):  # sum_c a_t[c] k_s[c] G(t, s)[c] where mask
        log_g = (total[:, :, a_rows, None] - total[:, :, None, :]).masked_fill(~mask[..., None], float("-inf"))
        return torch.einsum("bhtc,bhsc,bhtsc->bhts", a, k, torch.exp(log_g).expand(-1, -1, -1, -1, k.shape[-1]))

    lower = decayed(k, keys, allowed_keys(keys, n_keys) & (keys[:, None] != keys[None, :]))
    eye = torch.eye(n_keys, dtype=q.dtype, device=q.device)
    w = torch.linalg.inv(eye + beta[..., :, None] * lower) * beta[..., None, :]
    return decayed(q, rows, allowed_keys(rows, n_keys)) @ w
