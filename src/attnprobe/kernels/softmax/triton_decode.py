"""The split-K decode step (decode.py) as two Triton launches: per-split partials (m, l, o), then the combine.

Imported only where Triton runs (CUDA, or CPU under TRITON_INTERPRET=1); decode.py's `split_k_decode` picks it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnprobe.errors import AttnprobeError

from ..dispatch import interpreting
from .decode import BLOCK_N, LOG2E, check_decode_inputs, triton_fits


@triton.jit
def _split_kernel(Q, K, V, LENGTHS, O, M, L, scale_log2, KV_HEADS, SPLITS,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // KV_HEADS
    kv = bh % KV_HEADS
    length = tl.load(LENGTHS + b)
    span = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
    start = split * span
    stop = tl.minimum(start + span, length)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (kv * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=offs_g[:, None] < GROUP, other=0.0)
    k_head = K + b.to(tl.int64) * stride_kb + kv * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + kv * stride_vh
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DV], tl.float32)
    for n in range(start, stop, BLOCK):
        offs_n = n + tl.arange(0, BLOCK)
        valid = offs_n < stop
        k = tl.load(k_head + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        x = tl.where(valid[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))  # finite: every block holds a valid key
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(x - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        vals = tl.load(v_head + offs_n[:, None].to(tl.int64) * stride_vs + offs_v[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PRECISION)
        m = m_new
    row = (bh * SPLITS + split) * GROUP_PAD + offs_g
    tl.store(M + row, m)
    tl.store(L + row, l)
    tl.store(O + row[:, None] * DV + offs_v[None, :], acc)


@triton.jit
def _combine_kernel(O, M, L, OUT, KV_HEADS, SPLITS, stride_ob, stride_oh,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DV: tl.constexpr, SPLITS_PAD: tl.constexpr):
    bh = tl.program_id(0)
    g = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_v = tl.arange(0, DV)
    row = (bh * SPLITS + offs_s) * GROUP_PAD + g
    inside = offs_s < SPLITS
    m = tl.load(M + row, mask=inside, other=float("-inf"))
    l = tl.load(L + row, mask=inside, other=0.0)
    o = tl.load(O + row[:, None] * DV + offs_v[None, :], mask=inside[:, None], other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))
    z = tl.sum(weight[:, None] * o, axis=0) / tl.sum(weight * l, axis=0)
    b = bh // KV_HEADS
    head = (bh % KV_HEADS) * GROUP + g
    tl.store(OUT + b * stride_ob + head * stride_oh + offs_v, z.to(OUT.dtype.element_ty))


def _width(d: int) -> int:
    if not triton_fits(d):
        raise AttnprobeError(f"the Triton decode kernel takes head dims that are powers of two >= 16, got {d}: "
                             "use the torch path (--torch-kernels)")
    return d


def split_k_decode_triton(q, k, v, lengths, scaling: float, splits: int) -> torch.Tensor:
    """The split-K step as two Triton launches (partials, combine); no host sync, so a CUDA graph can hold it."""
    check_decode_inputs(q, k, v)
    batch, heads, _, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    group = heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise AttnprobeError("the cache's last dim must be contiguous: pass the cache's buffers as they are")
    q = q.contiguous()
    partial = q.new_empty((batch * kv_heads * splits * group_pad, _width(dv)), dtype=torch.float32)
    m = q.new_empty((batch * kv_heads * splits * group_pad,), dtype=torch.float32)
    l = torch.empty_like(m)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kernel[(batch * kv_heads, splits)](
        q, k, v, lengths, partial, m, l, scaling * LOG2E, kv_heads, splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        GROUP=group, GROUP_PAD=group_pad, D=_width(dim), DV=dv, BLOCK=BLOCK_N, PRECISION=precision,
        **({} if interpreting() else {"num_warps": 4, "num_stages": 2}))
    out = q.new_empty((batch, heads, 1, dv))
    _combine_kernel[(batch * kv_heads, group)](partial, m, l, out, kv_heads, splits, out.stride(0), out.stride(1),
                                               GROUP=group, GROUP_PAD=group_pad, DV=dv,
                                               SPLITS_PAD=max(2, triton.next_power_of_2(splits)))
    return out
