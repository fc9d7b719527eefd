"""The split-K decode step's two Triton kernels: per-split partials (m, l, o), then the combine.

Launched by decode.py's `split_k_decode_triton`, which imports this module only where Triton runs (CUDA, or
CPU under TRITON_INTERPRET=1 in tests).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_kernel(Q, K, V, LENGTHS, O, M, L, scale_log2, KV_HEADS, SPLITS, KEYS,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // KV_HEADS
    kv = bh % KV_HEADS
    length = tl.minimum(tl.load(LENGTHS + b), KEYS)  # never past the buffer, whatever a caller hands over
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
def combine_kernel(O, M, L, OUT, KV_HEADS, SPLITS, stride_ob, stride_oh,
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
