"""The split-K decode step (kernels/softmax/decode.py) against SDPA: the torch form on CPU, the Triton kernel
through Triton's interpreter (as tests/test_triton.py runs the other kernels); tests/test_decode_cuda.py runs
the compiled kernel on a GPU."""
from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's import: its library functions interpret too

import pytest
import torch
import torch.nn.functional as F

from attnprobe.errors import AttnprobeError

pytest.importorskip("triton", reason="triton is not installed on this platform")

from attnprobe.kernels.softmax import decode, triton_decode  # noqa: E402
from interpreted import interpreted as interpreted_modules  # noqa: E402

# (batch, query heads, KV heads, buffer length, head dim, valid lengths per sequence)
SHAPES = [(1, 4, 4, 37, 16, [37]), (2, 9, 3, 300, 64, [300, 129]), (3, 14, 2, 200, 64, [1, 64, 65]),
          (2, 8, 1, 130, 32, [130, 2])]


def cache(batch, heads, kv_heads, length, dim, lengths, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype) * 2
    v = torch.randn(batch, kv_heads, length, dim, generator=gen).to(dtype)
    lengths = torch.tensor(lengths)
    invalid = torch.arange(length)[None, :] >= lengths[:, None]
    k[invalid[:, None].expand_as(k[..., 0])] = 1e4  # what lies past a sequence's length must not count
    return q, k, v, lengths


def sdpa(q, k, v, lengths, scaling):
    group = q.shape[1] // k.shape[1]
    outs = []
    for b, n in enumerate(lengths.tolist()):
        keys = k[b:b + 1, :, :n].repeat_interleave(group, 1).float()
        values = v[b:b + 1, :, :n].repeat_interleave(group, 1).float()
        outs.append(F.scaled_dot_product_attention(q[b:b + 1].float(), keys, values, scale=scaling))
    return torch.cat(outs).to(q.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits", [1, 3, 16])
def test_the_torch_split_k_step_equals_sdpa_over_the_valid_keys(shape, splits):
    q, k, v, lengths = cache(*shape)
    got = decode.split_k_decode_reference(q, k, v, lengths, 0.3, splits)
    torch.testing.assert_close(got, sdpa(q, k, v, lengths, 0.3), atol=1e-5, rtol=1e-5)


def test_splits_fill_the_programs_and_cover_every_key():
    assert decode.split_count(3, 32768, 528) == 128 and decode.split_count(24, 32768, 528) == 22
    assert decode.split_count(96, 32768, 528) == 6 and decode.split_count(2, 100, 528) == 2  # no split under a block
    lengths = torch.tensor([1, 64, 65, 32768, 1000])
    for splits in (1, 5, 22, 128):
        span = decode.split_spans(lengths, splits)
        assert bool((span % decode.BLOCK_N == 0).all()) and bool((span * splits >= lengths).all())
        assert bool(((span - decode.BLOCK_N) * splits < lengths).all())  # no split a whole block longer than needed


def test_bad_shapes_name_the_fix():
    q, k, v, lengths = cache(*SHAPES[1])
    with pytest.raises(AttnprobeError, match="prefill with SDPA"):
        decode.split_k_decode(torch.cat([q, q], 2), k, v, lengths, 0.3)
    with pytest.raises(AttnprobeError, match="head counts"):
        decode.split_k_decode(q[:, :8], k, v, lengths, 0.3)


@pytest.fixture(scope="module")
def interpreted():
    with interpreted_modules(triton_decode):
        yield decode


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("splits", [1, 5])
def test_the_triton_split_k_step_equals_sdpa_under_the_interpreter(interpreted, shape, splits):
    from attnprobe.kernels.dispatch import triton_on_cpu

    q, k, v, lengths = cache(*shape)
    want = sdpa(q, k, v, lengths, 0.3)
    torch.testing.assert_close(interpreted.split_k_decode_triton(q, k, v, lengths, 0.3, splits), want, atol=1e-4, rtol=1e-4)
    with triton_on_cpu():  # CPU tensors stay on the torch form (the Triton kernel runs on CUDA)
        assert torch.equal(decode.split_k_decode(q, k, v, lengths, 0.3, splits), decode.split_k_decode_reference(q, k, v, lengths, 0.3, splits))


def test_head_dims_the_triton_kernel_cannot_take_run_the_torch_form(interpreted):
    q, k, v, lengths = cache(2, 6, 2, 90, 48, [90, 33])  # 48: not a power of two
    assert not decode.triton_fits(48) and decode.triton_fits(64)
    with pytest.raises(AttnprobeError, match="powers of two"):
        interpreted.split_k_decode_triton(q, k, v, lengths, 0.3, 2)
    torch.testing.assert_close(decode.split_k_decode(q, k, v, lengths, 0.3), sdpa(q, k, v, lengths, 0.3), atol=1e-5, rtol=1e-5)

