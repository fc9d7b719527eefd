"""Split-K (flash-decoding) softmax attention: one decode step over a KV cache, near the memory bound.

A decode step has one query per sequence, so a kernel that gives each (sequence, head) one program leaves
most of the GPU idle while it reads the cache. Flash-decoding (Dao, Haziza, Massa, Sizov, 2023) cuts the
keys into `splits` parts read in parallel; part s gives each query head its max m_s (base-2 logits), its sum
of exponentials l_s = sum exp2(x - m_s) and its unnormalised output o_s = sum exp2(x - m_s) v; then

    M = max_s m_s,   z = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s

which is softmax(scaling * q k^T) v over every valid key. Shapes: q (B, H, 1, d); k, v (B, Hkv, S, d) of
which the first `lengths[b]` positions are valid (a StaticCache's buffers); under GQA query head h reads KV
head h // (H / Hkv), and one program reads a KV head's keys once for all of its query heads.

The split count is fixed by the buffers' shape; the span a split covers follows the valid length (a whole
number of key blocks), so every valid key is read once at any length, and a CUDA graph replays the step as
`lengths` (a GPU tensor) grows. `split_k_decode_reference` is the same partition and combine in torch (CPU,
tests); the Triton kernels (triton_decode.py, imported where Triton runs) are the GPU's.
"""
from __future__ import annotations

import math

import torch

from attnprobe.errors import AttnprobeError

from ..dispatch import interpreting, use_triton

LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per inner step; a split spans a whole number of these
MAX_SPLITS = 128


def check_decode_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape[:3] != k.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise AttnprobeError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be (B, H, 1, d), "
                             "(B, Hkv, S, d), (B, Hkv, S, dv): pass the cache's buffers")
    if q.shape[2] != 1:
        raise AttnprobeError(f"split-K decoding takes one query per sequence, got {q.shape[2]}: prefill with SDPA")
    if q.shape[1] % k.shape[1]:
        raise AttnprobeError(f"{q.shape[1]} query heads do not share {k.shape[1]} KV heads evenly: check the model's head counts")


def split_count(batch_kv_heads: int, max_length: int, programs: int) -> int:
    """Splits per (sequence, KV head): enough programs to fill `programs` slots, no split shorter than a block."""
    wanted = math.ceil(programs / max(batch_kv_heads, 1))
    return max(1, min(wanted, math.ceil(max_length / BLOCK_N), MAX_SPLITS))


def split_spans(lengths: torch.Tensor, splits: int) -> torch.Tensor:
    """Keys per split for each sequence: ceil(length / splits) rounded up to a whole block (the kernel's rule)."""
    per = (lengths + splits - 1) // splits
    return ((per + BLOCK_N - 1) // BLOCK_N) * BLOCK_N


def combine_splits(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Flash-decoding's combine over the split axis (dim 0): m, l (S, ...) base-2, o (S, ..., dv)."""
    top = m.amax(0)
    weight = torch.exp2(m - top)  # an empty split (m = -inf) weighs 0
    return (weight[..., None] * o).sum(0) / (weight * l).sum(0)[..., None]


def split_k_decode_reference(q, k, v, lengths, scaling: float, splits: int) -> torch.Tensor:
    """The split-K step in torch, fp32: partial (m, l, o) per split, then `combine_splits`. Returns (B, H, 1, dv)."""
    check_decode_inputs(q, k, v)
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,bksd->bkgs", grouped, k.float()) * (scaling * LOG2E)
    positions = torch.arange(keys, device=q.device)
    part = positions[None, :] // split_spans(lengths.to(q.device), splits)[:, None]  # (B, S)
    valid = positions[None, :] < lengths.to(q.device)[:, None]
    ms, ls, os = [], [], []
    for split in range(splits):
        keep = (valid & (part == split))[:, None, None, :]
        x = scores.masked_fill(~keep, float("-inf"))
        m = x.amax(-1)
        p = torch.exp2(x - torch.where(torch.isinf(m), 0.0, m)[..., None])
        ms.append(m)
        ls.append(p.sum(-1))
        os.append(torch.einsum("bkgs,bksd->bkgd", p, v.float()))
    z = combine_splits(torch.stack(ms), torch.stack(ls), torch.stack(os))
    return z.reshape(batch, heads, 1, v.shape[-1]).to(q.dtype)


def triton_fits(d: int) -> bool:
    """Head dims the Triton kernel takes whole (tl.arange needs a power of two; tl.dot at least 16)."""
    return d >= 16 and not d & (d - 1)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _width(d: int) -> int:
    if not triton_fits(d):
        raise AttnprobeError(f"the Triton decode kernel takes head dims that are powers of two >= 16, got {d}: "
                             "use the torch path (--torch-kernels)")
    return d


def split_k_decode_triton(q, k, v, lengths, scaling: float, splits: int) -> torch.Tensor:
    """The split-K step as two Triton launches (partials, combine); no host sync, so a CUDA graph can hold it."""
    from .triton_decode import combine_kernel, split_kernel

    check_decode_inputs(q, k, v)
    batch, heads, _, dim = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    group = heads // kv_heads
    group_pad = max(16, _next_power_of_2(group))  # tl.dot needs 16 rows
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise AttnprobeError("the cache's last dim must be contiguous: pass the cache's buffers as they are")
    q = q.contiguous()
    partial = q.new_empty((batch * kv_heads * splits * group_pad, _width(dv)), dtype=torch.float32)
    m = q.new_empty((batch * kv_heads * splits * group_pad,), dtype=torch.float32)
    l = torch.empty_like(m)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    split_kernel[(batch * kv_heads, splits)](
        q, k, v, lengths, partial, m, l, scaling * LOG2E, kv_heads, splits, k.shape[2],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        GROUP=group, GROUP_PAD=group_pad, D=_width(dim), DV=dv, BLOCK=BLOCK_N, PRECISION=precision,
        **({} if interpreting() else {"num_warps": 4, "num_stages": 2}))
    out = q.new_empty((batch, heads, 1, dv))
    combine_kernel[(batch * kv_heads, group)](partial, m, l, out, kv_heads, splits, out.stride(0), out.stride(1),
                                               GROUP=group, GROUP_PAD=group_pad, DV=dv,
                                               SPLITS_PAD=max(2, _next_power_of_2(splits)))
    return out


def programs_to_fill(device: torch.device) -> int:
    """Programs that keep every SM of a GPU reading (4 per SM); a fixed small number elsewhere."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def split_k_decode(q, k, v, lengths, scaling: float, splits: int | None = None) -> torch.Tensor:
    """softmax(scaling q k^T) v for one query per sequence over the first `lengths[b]` cached keys: (B, H, 1, dv).
    Triton on CUDA for head dims it takes, the torch reference elsewhere (tests run the Triton kernel on CPU
    by calling `split_k_decode_triton` under the interpreter: model-level tests that send CPU tensors to
    Triton reload only their own kernels for it)."""
    if splits is None:
        splits = split_count(k.shape[0] * k.shape[1], k.shape[2], programs_to_fill(q.device))
    if q.is_cuda and use_triton(q) and triton_fits(q.shape[-1]) and triton_fits(v.shape[-1]):
        return split_k_decode_triton(q, k, v, lengths, scaling, splits)
    return split_k_decode_reference(q, k, v, lengths, scaling, splits)
