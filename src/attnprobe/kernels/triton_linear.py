"""Causal linear attention and per-head hybrids as Triton forward kernels, each beside a torch reference.

Inputs are already feature-mapped: phi(q), phi(k) of width F, values of width Dv. The normalized
output is z_t = sum_{s<=t} (phi_q_t . phi_k_s) v_s / max(sum_{s<=t} phi_q_t . phi_k_s, eps), eps the
smallest normal fp32 (as the torch kernels): feature maps like Hedgehog give sums far below 1e-6.

  - chunked prefill (two launches, as flash-linear-attention does it): `_chunk_state_kernel` scans the
    chunks of a head and writes the state S = sum phi_k v^T (and n = sum phi_k) before each chunk;
    `_chunk_output_kernel` then does every chunk in parallel: phi_q S + the masked intra-chunk part.
  - decode: `_decode_step_kernel` adds one token to the state in place and reads it out.
  - hybrid: `_hybrid_kernel` runs one layer's heads in one launch, each with its own mode
    (0: softmax over a sliding window, or full causal when window is None; 1: linear). A program owns
    a segment of the sequence; a linear head first rebuilds its state from the tokens before the
    segment (a read of k, v, no extra launch), which keeps every SM busy even at batch 1.
Set TRITON_INTERPRET=1 before importing triton to run them on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnprobe.errors import AttnprobeError

from .base import CHUNK
from .base import TINY as EPS
from .dispatch import interpreting, triton_runs_on
from .triton_stats import LOG2E, padded_heads

SOFTMAX, LINEAR = 0, 1


# ---------------------------------------------------------------- torch references

def linear_attention_reference(phi_q, phi_k, v, normalize: bool = True, eps: float = EPS):
    """Quadratic form: ((phi_q phi_k^T) * causal) v, divided by its row sums. (B,H,T,F),(B,H,T,F),(B,H,T,Dv)."""
    weights = torch.matmul(phi_q.float(), phi_k.float().transpose(-1, -2)).tril()
    out = torch.matmul(weights, v.float())
    if normalize:
        out = out / weights.sum(-1, keepdim=True).clamp_min(eps)
    return out.to(v.dtype)


def decode_step_reference(phi_q, phi_k, v, state, normalizer, normalize: bool = True, eps: float = EPS):
    """One recurrent step: returns (z (B,H,Dv), new state (B,H,F,Dv), new normalizer (B,H,F))."""
    state = state + phi_k.float()[..., :, None] * v.float()[..., None, :]
    normalizer = normalizer + phi_k.float()
    out = torch.einsum("bhf,bhfv->bhv", phi_q.float(), state)
    if normalize:
        out = out / (phi_q.float() * normalizer).sum(-1, keepdim=True).clamp_min(eps)
    return out.to(v.dtype), state, normalizer


def window_softmax_reference(q, k, v, scaling: float, window: int | None):
    n = q.shape[2]
    index = torch.arange(n, device=q.device)
    allowed = index[None, :] <= index[:, None]
    if window is not None:
        allowed &= (index[:, None] - index[None, :]) < window
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    return torch.matmul(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1), v.float()).to(v.dtype)


def hybrid_reference(q, k, v, phi_q, phi_k, modes, scaling: float, window: int | None, eps: float = EPS):
    """Per head: mode 0 softmax (sliding `window`), mode 1 normalized linear on the next slot of phi_q/phi_k."""
    out = torch.empty_like(v)
    slot = 0
    for head, mode in enumerate(modes):
        if mode == SOFTMAX:
            out[:, head] = window_softmax_reference(q[:, head:head + 1], k[:, head:head + 1], v[:, head:head + 1],
                                                    scaling, window)[:, 0]
        else:
            out[:, head] = linear_attention_reference(phi_q[:, slot], phi_k[:, slot], v[:, head], eps=eps)
            slot += 1
    return out


# ---------------------------------------------------------------- kernels

@triton.jit
def _chunk_state_kernel(K, V, STATES, NORMS, T,
                        F: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
                        PRECISION: tl.constexpr):
    pid_v = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_f = tl.arange(0, F)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    n_chunks = tl.cdiv(T, CHUNK)
    state = tl.zeros([F, BLOCK_V], dtype=tl.float32)
    norm = tl.zeros([F], dtype=tl.float32)
    for c in range(0, n_chunks):
        slot = head * n_chunks + c
        tl.store(STATES + (slot * F + offs_f[:, None]) * DV + offs_v[None, :], state)
        tl.store(NORMS + slot * F + offs_f, norm, mask=offs_f + pid_v * F < F)  # value block 0 writes n
        rows = c * CHUNK + offs_c
        k = tl.load(K + head * T * F + rows[:, None] * F + offs_f[None, :], mask=rows[:, None] < T, other=0.0)
        v = tl.load(V + head * T * DV + rows[:, None] * DV + offs_v[None, :], mask=rows[:, None] < T, other=0.0)
        state += tl.dot(tl.trans(k), v, input_precision=PRECISION)
        norm += tl.sum(k.to(tl.float32), axis=0)


@triton.jit
def _chunk_output_kernel(Q, K, V, STATES, NORMS, O, T, eps,
                         F: tl.constexpr, DV: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
                         NORMALIZE: tl.constexpr, PRECISION: tl.constexpr):
    c = tl.program_id(0)
    pid_v = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    offs_f = tl.arange(0, F)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, CHUNK)
    rows = c * CHUNK + offs_c
    in_range = rows[:, None] < T
    q = tl.load(Q + head * T * F + rows[:, None] * F + offs_f[None, :], mask=in_range, other=0.0)
    k = tl.load(K + head * T * F + rows[:, None] * F + offs_f[None, :], mask=in_range, other=0.0)
    v = tl.load(V + head * T * DV + rows[:, None] * DV + offs_v[None, :], mask=in_range, other=0.0)
    slot = head * tl.cdiv(T, CHUNK) + c
    state = tl.load(STATES + (slot * F + offs_f[:, None]) * DV + offs_v[None, :])
    weights = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    weights = tl.where(offs_c[:, None] >= offs_c[None, :], weights, 0.0)
    out = tl.dot(q, state.to(q.dtype), input_precision=PRECISION)
    out += tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
    if NORMALIZE:
        norm = tl.load(NORMS + slot * F + offs_f)
        den = tl.sum(q.to(tl.float32) * norm[None, :], axis=1) + tl.sum(weights, axis=1)
        out = out / tl.maximum(den, eps)[:, None]
    tl.store(O + head * T * DV + rows[:, None] * DV + offs_v[None, :], out.to(O.dtype.element_ty), mask=in_range)


@triton.jit
def _decode_step_kernel(Q, K, V, STATE, NORM, O, F, DV, eps,
                        F_PAD: tl.constexpr, BLOCK_V: tl.constexpr, NORMALIZE: tl.constexpr):
    pid_v = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_f = tl.arange(0, F_PAD)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = offs_f < F
    v_ok = offs_v < DV
    q = tl.load(Q + head * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    k = tl.load(K + head * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    v = tl.load(V + head * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    state_ptrs = STATE + head * F * DV + offs_f[:, None] * DV + offs_v[None, :]
    both_ok = f_ok[:, None] & v_ok[None, :]
    state = tl.load(state_ptrs, mask=both_ok, other=0.0) + k[:, None] * v[None, :]
    tl.store(state_ptrs, state, mask=both_ok)
    norm = tl.load(NORM + head * F + offs_f, mask=f_ok, other=0.0) + k
    tl.store(NORM + head * F + offs_f, norm, mask=offs_f + pid_v * F_PAD < F)  # value block 0 writes n
    out = tl.sum(q[:, None] * state, axis=0)
    if NORMALIZE:
        out = out / tl.maximum(tl.sum(q * norm, axis=0), eps)
    tl.store(O + head * DV + offs_v, out.to(O.dtype.element_ty), mask=v_ok)


@triton.jit
def _softmax_segment(Q, K, V, O, head, seg_start, seg_end, T, window, scale_log2,
                     D: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    offs_b = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    for start_m in range(seg_start, seg_end, BLOCK):
        rows = start_m + offs_b
        q = tl.load(Q + head * T * D + rows[:, None] * D + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, DV], dtype=tl.float32)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(start_m - window + 1, 0) // BLOCK * BLOCK
        for start_n in range(lo, tl.minimum(start_m + BLOCK, T), BLOCK):
            cols = start_n + offs_b
            k = tl.load(K + head * T * D + cols[:, None] * D + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
            v = tl.load(V + head * T * DV + cols[:, None] * DV + offs_v[None, :], mask=cols[:, None] < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            allowed = cols[None, :] <= rows[:, None]
            if HAS_WINDOW:
                allowed &= (rows[:, None] - cols[None, :]) < window
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            rescale = tl.exp2(m_i - m_safe)
            l_i = l_i * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(O + head * T * DV + rows[:, None] * DV + offs_v[None, :], out.to(O.dtype.element_ty),
                 mask=rows[:, None] < T)


@triton.jit
def _linear_segment(FQ, FK, V, O, head, lin_head, seg_start, seg_end, T, eps,
                    F: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    offs_b = tl.arange(0, BLOCK)
    offs_f = tl.arange(0, F)
    offs_v = tl.arange(0, DV)
    state = tl.zeros([F, DV], dtype=tl.float32)
    norm = tl.zeros([F], dtype=tl.float32)
    for start in range(0, seg_start, BLOCK):  # the tokens before our segment: state only
        rows = start + offs_b
        k = tl.load(FK + lin_head * T * F + rows[:, None] * F + offs_f[None, :])
        v = tl.load(V + head * T * DV + rows[:, None] * DV + offs_v[None, :])
        state += tl.dot(tl.trans(k), v, input_precision=PRECISION)
        norm += tl.sum(k.to(tl.float32), axis=0)
    for start in range(seg_start, seg_end, BLOCK):  # our chunks: read the state out, then add the chunk
        rows = start + offs_b
        in_range = rows[:, None] < T
        q = tl.load(FQ + lin_head * T * F + rows[:, None] * F + offs_f[None, :], mask=in_range, other=0.0)
        k = tl.load(FK + lin_head * T * F + rows[:, None] * F + offs_f[None, :], mask=in_range, other=0.0)
        v = tl.load(V + head * T * DV + rows[:, None] * DV + offs_v[None, :], mask=in_range, other=0.0)
        weights = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        weights = tl.where(offs_b[:, None] >= offs_b[None, :], weights, 0.0)
        out = tl.dot(q, state.to(q.dtype), input_precision=PRECISION)
        out += tl.dot(weights.to(v.dtype), v, input_precision=PRECISION)
        den = tl.sum(q.to(tl.float32) * norm[None, :], axis=1) + tl.sum(weights, axis=1)
        out = out / tl.maximum(den, eps)[:, None]
        tl.store(O + head * T * DV + rows[:, None] * DV + offs_v[None, :], out.to(O.dtype.element_ty), mask=in_range)
        state += tl.dot(tl.trans(k), v, input_precision=PRECISION)
        norm += tl.sum(k.to(tl.float32), axis=0)


@triton.jit
def _hybrid_kernel(Q, K, FQ, FK, V, O, MODES, SLOTS, H, H_LINEAR, T, SEGMENT, window, scale_log2, eps,
                   D: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, BLOCK: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    head_in_layer = head % H
    seg_start = seg * SEGMENT
    seg_end = tl.minimum(seg_start + SEGMENT, T)
    if tl.load(MODES + head_in_layer) == 0:
        _softmax_segment(Q, K, V, O, head, seg_start, seg_end, T, window, scale_log2,
                         D, DV, BLOCK, HAS_WINDOW, PRECISION)
    else:
        lin_head = (head // H) * H_LINEAR + tl.load(SLOTS + head_in_layer)
        _linear_segment(FQ, FK, V, O, head, lin_head, seg_start, seg_end, T, eps, F, DV, BLOCK, PRECISION)


# ---------------------------------------------------------------- wrappers

def _flat(x: torch.Tensor) -> torch.Tensor:
    return padded_heads(x, what="feature or value width")


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _require_triton(x: torch.Tensor) -> None:
    if not triton_runs_on(x):
        raise AttnprobeError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU ones): use the torch reference instead")


def chunked_linear_attention(phi_q, phi_k, v, normalize: bool = True, eps: float = EPS) -> torch.Tensor:
    """Causal linear attention, (B,H,T,F) x2 and (B,H,T,Dv) -> (B,H,T,Dv) in v's dtype."""
    _require_triton(v)
    batch, heads, n, dv = v.shape
    fq, fk, vf = _flat(phi_q.to(v.dtype)), _flat(phi_k.to(v.dtype)), _flat(v)
    width, dv_pad = fq.shape[-1], vf.shape[-1]
    n_chunks = triton.cdiv(n, CHUNK)
    states = torch.empty(batch * heads, n_chunks, width, dv_pad, device=v.device, dtype=torch.float32)
    norms = torch.empty(batch * heads, n_chunks, width, device=v.device, dtype=torch.float32)
    out = torch.empty_like(vf)
    block_v = min(dv_pad, 64)
    warps = {} if interpreting() else {"num_warps": 4}
    _chunk_state_kernel[(dv_pad // block_v, batch * heads)](fk, vf, states, norms, n, F=width, DV=dv_pad, CHUNK=CHUNK,
                                                            BLOCK_V=block_v, PRECISION=_precision(v), **warps)
    _chunk_output_kernel[(n_chunks, dv_pad // block_v, batch * heads)](
        fq, fk, vf, states, norms, out, n, eps, F=width, DV=dv_pad, CHUNK=CHUNK, BLOCK_V=block_v,
        NORMALIZE=normalize, PRECISION=_precision(v), **warps)
    return out.view(batch, heads, n, dv_pad)[..., :dv]


def linear_decode_step(phi_q, phi_k, v, state, normalizer, normalize: bool = True, eps: float = EPS) -> torch.Tensor:
    """One decode step, updating `state` (B,H,F,Dv) and `normalizer` (B,H,F) in place (both fp32, contiguous).

    phi_q, phi_k (B,H,F), v (B,H,Dv); returns z (B,H,Dv) in v's dtype."""
    _require_triton(v)
    if state.dtype != torch.float32 or not state.is_contiguous() or not normalizer.is_contiguous():
        raise AttnprobeError("the decode state and normalizer must be contiguous fp32 tensors: make them with torch.zeros(..., dtype=torch.float32)")
    width, dv = phi_q.shape[-1], v.shape[-1]
    block_v = min(triton.next_power_of_2(dv), 64)
    out = torch.empty_like(v)
    heads = v.shape[0] * v.shape[1]
    _decode_step_kernel[(triton.cdiv(dv, block_v), heads)](
        phi_q.contiguous(), phi_k.contiguous(), v.contiguous(), state, normalizer, out, width, dv, eps,
        F_PAD=max(16, triton.next_power_of_2(width)), BLOCK_V=block_v, NORMALIZE=normalize)
    return out


def _segment_length(n: int, programs_per_segment: int, device) -> int:
    """Cut T so that segments x heads fills the GPU about twice over (a linear head re-reads its prefix per segment)."""
    if interpreting():
        return CHUNK
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_segments = max(1, min(triton.cdiv(2 * sms, programs_per_segment), triton.cdiv(n, CHUNK)))
    return triton.cdiv(triton.cdiv(n, n_segments), CHUNK) * CHUNK


def hybrid_attention(q, k, v, phi_q, phi_k, modes, scaling: float, window: int | None, eps: float = EPS,
                     segment: int | None = None) -> torch.Tensor:
    """One layer's heads in one launch: head h is softmax (mode 0, sliding `window`; full causal if None)
    or normalized linear (mode 1). q, k, v (B,H,T,d) with k, v repeated for GQA; phi_q, phi_k
    (B, H_linear, T, F) hold the linear heads in head order. `segment` (a multiple of 64) overrides the
    sequence split. Returns (B,H,T,Dv) in v's dtype."""
    _require_triton(v)
    batch, heads, n, dv = v.shape
    modes = [int(m) for m in modes]
    n_linear = sum(m == LINEAR for m in modes)
    if len(modes) != heads or any(m not in (SOFTMAX, LINEAR) for m in modes):
        raise AttnprobeError(f"modes must give 0 (softmax) or 1 (linear) for each of the {heads} heads; got {modes}")
    if phi_q.shape[1] != n_linear or phi_k.shape[1] != n_linear:
        raise AttnprobeError(f"phi_q/phi_k hold {phi_q.shape[1]} heads but modes mark {n_linear} linear heads")
    if segment is not None and segment % CHUNK:
        raise AttnprobeError(f"segment must be a multiple of {CHUNK}; got {segment}")
    if n_linear == 0:  # the kernel never reads phi then, but wants a real pointer
        phi_q = phi_k = v.new_zeros(1, 1, 1, 16)
    qf, kf, vf = _flat(q.to(v.dtype)), _flat(k.to(v.dtype)), _flat(v)
    fq, fk = _flat(phi_q.to(v.dtype)), _flat(phi_k.to(v.dtype))
    slots, next_slot = [], 0
    for mode in modes:  # each linear head's index among the linear heads
        slots.append(next_slot)
        next_slot += mode == LINEAR
    modes_t = torch.tensor(modes, dtype=torch.int32, device=v.device)
    slots_t = torch.tensor(slots, dtype=torch.int32, device=v.device)
    segment = segment or _segment_length(n, batch * heads, v.device)
    out = torch.empty_like(vf)
    warps = {} if interpreting() else {"num_warps": 8 if max(fq.shape[-1], vf.shape[-1]) > 64 else 4}
    _hybrid_kernel[(triton.cdiv(n, segment), batch * heads)](
        qf, kf, fq, fk, vf, out, modes_t, slots_t, heads, max(n_linear, 1), n, segment, window or 0,
        scaling * LOG2E, eps, D=qf.shape[-1], F=fq.shape[-1], DV=vf.shape[-1], BLOCK=CHUNK,
        HAS_WINDOW=window is not None, PRECISION=_precision(v), **warps)
    return out.view(batch, heads, n, vf.shape[-1])[..., :dv]
