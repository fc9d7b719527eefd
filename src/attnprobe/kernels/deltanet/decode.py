"""One fused decode step of the delta rule (DeltaNet, Gated DeltaNet, KDA) in Triton, the state updated in place.

The step is `DeltaKernel.step` (kernel.py) in one launch: with q, k L2-normalised, beta_t and the decay
a_t (one per head, one per channel for KDA, 1 for DeltaNet),

    S <- diag(a_t) S;   u = beta_t (v_t - S^T k_t);   S <- S + k_t u^T;   z_t = S^T q_t

One program owns one (sequence, head) and a block of value columns: it reads its columns of S once, writes
them once, so the step moves the state twice and nothing else (what a memory-bound step can do). The state
stays at its address, which a CUDA graph needs. fla's fused recurrent ops do the same where fla runs
(kernels/fla.py); this one covers the GPUs without fla, and KDA, which fla's op does not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnprobe.errors import AttnprobeError

from ..dispatch import interpreting


@triton.jit
def _delta_step_kernel(Q, K, V, BETA, LOG_ALPHA, S, OUT, stride_alpha_bh, stride_alpha_c,
                       DK: tl.constexpr, DV: tl.constexpr, BLOCK_V: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_k = tl.arange(0, DK)
    offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = offs_v < DV
    state_ptrs = S + bh * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    state = tl.load(state_ptrs, mask=inside[None, :], other=0.0)
    decay = tl.exp(tl.load(LOG_ALPHA + bh * stride_alpha_bh + offs_k * stride_alpha_c))
    state = decay[:, None] * state
    k = tl.load(K + bh * DK + offs_k)
    q = tl.load(Q + bh * DK + offs_k)
    v = tl.load(V + bh * DV + offs_v, mask=inside, other=0.0)
    beta = tl.load(BETA + bh)
    u = beta * (v - tl.sum(k[:, None] * state, axis=0))
    state = state + k[:, None] * u[None, :]
    tl.store(state_ptrs, state, mask=inside[None, :])
    tl.store(OUT + bh * DV + offs_v, tl.sum(q[:, None] * state, axis=0), mask=inside)


def step_fits(dk: int) -> bool:
    """Key dims the Triton step takes whole (tl.arange needs a power of two)."""
    return dk >= 16 and not dk & (dk - 1)


def delta_decode_step(qn, kn, v, beta, log_alpha, state) -> torch.Tensor:
    """One token: qn, kn (B, H, dk), v (B, H, dv), beta (B, H), log alpha (B, H, 1) or (B, H, dk), all fp32;
    `state` (B, H, dk, dv) fp32 contiguous, advanced in place. Returns z (B, H, dv) fp32."""
    batch, heads, dk = kn.shape
    dv = v.shape[-1]
    if state.shape != (batch, heads, dk, dv) or not state.is_contiguous() or state.dtype != torch.float32:
        raise AttnprobeError(f"the delta-rule state must be a contiguous fp32 (B, H, dk, dv) = {(batch, heads, dk, dv)}, "
                             f"got {tuple(state.shape)} {state.dtype}: keep the state the prefill returned")
    if not step_fits(dk):
        raise AttnprobeError(f"the Triton delta-rule step takes key dims that are powers of two >= 16, got {dk}: use the torch step")
    qn, kn, v, beta = (x.float().contiguous() for x in (qn, kn, v, beta))
    log_alpha = log_alpha.float().contiguous()
    per_channel = log_alpha.shape[-1] > 1
    out = torch.empty_like(v)
    block = min(64, triton.next_power_of_2(dv))
    _delta_step_kernel[(batch * heads, triton.cdiv(dv, block))](
        qn, kn, v, beta, log_alpha, state, out, log_alpha.shape[-1], 1 if per_channel else 0,
        DK=dk, DV=dv, BLOCK_V=block, **({} if interpreting() else {"num_warps": 4}))
    return out


def fused_delta_decode(kernel, state, q, k, v, scaling):
    """`kernel.decode` (q, k, v (B, H, n, d) of a DeltaKernel) through `delta_decode_step`, token by token;
    the state is advanced in place (a copy first if it is not contiguous fp32)."""
    dtype = q.dtype
    qn, kn, values, beta, log_alpha = kernel._inputs(q, k, v)
    state = state.float().contiguous()
    steps = [delta_decode_step(qn[:, :, t], kn[:, :, t], values[:, :, t], beta[:, :, t], log_alpha[:, :, t], state)
             for t in range(q.shape[2])]
    return torch.stack(steps, dim=2).to(dtype), state
