"""The compiled decode kernels on a GPU (skipped elsewhere), kept apart from the interpreter tests so nothing
here runs interpreted: the split-K softmax step against SDPA, the fused delta-rule step against the torch step,
and the split-K baseline's CUDA-graph decode against SDPA's on a tiny model."""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from attnprobe.kernels.registry import make_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on CUDA")


@pytest.mark.parametrize("batch, heads, kv_heads, dim, lengths", [(2, 9, 3, 64, [300, 129]), (3, 14, 2, 64, [1, 64, 65]),
                                                              (2, 8, 1, 128, [4100, 2])])
def test_the_compiled_split_k_step_equals_sdpa(batch, heads, kv_heads, dim, lengths):
    from attnprobe.kernels.softmax import decode

    torch.manual_seed(0)
    q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_heads, max(lengths) + 7, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got = decode.split_k_decode(q, k, v, torch.tensor(lengths, device="cuda"), 0.125)
    group = heads // kv_heads
    for b, n in enumerate(lengths):  # SDPA over each sequence's valid keys
        want = F.scaled_dot_product_attention(q[b:b + 1].float(), k[b:b + 1, :, :n].repeat_interleave(group, 1).float(),
                                              v[b:b + 1, :, :n].repeat_interleave(group, 1).float(), scale=0.125)
        torch.testing.assert_close(got[b:b + 1].float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["deltanet", "gated-deltanet", "kda"])
def test_the_compiled_delta_step_equals_the_torch_step(name):
    from attnprobe.kernels.deltanet import decode

    torch.manual_seed(1)
    kernel = make_kernel(name, 4, 64)
    with torch.no_grad():  # beta and the gate depend on the key, as after training
        for param in kernel.parameters():
            param.add_(0.3 * torch.randn_like(param))
    kernel = kernel.cuda()
    q, k, v = (torch.randn(2, 4, 40, 64, device="cuda") for _ in range(3))
    _, state = kernel.prefill(q[:, :, :32], k[:, :, :32], v[:, :, :32], 0.125)
    want, want_state = kernel.decode(state.clone(), q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], 0.125)
    got, got_state = decode.fused_delta_decode(kernel, state.clone(), q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], 0.125)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_state, want_state, atol=1e-4, rtol=1e-4)


def test_the_baseline_under_a_cuda_graph_decodes_what_sdpa_decodes():
    from tiny_hf import TinyTokenizer, tiny_llama, wrap

    from attnprobe.analyses.efficiency.decoding import measure_decoding

    model = wrap(tiny_llama().cuda(), TinyTokenizer())
    sdpa = measure_decoding(model, None, [], 100, new_tokens=12, batch=3, graph=True)
    split = measure_decoding(model, None, [], 100, new_tokens=12, batch=3, graph=True, attention="split-k")
    assert split["decode_mode"] == "cuda-graph" and torch.equal(split["tokens"], sdpa["tokens"])


@pytest.mark.parametrize("context", [16384, 32768])
def test_the_baseline_decodes_long_contexts_in_a_models_shape_as_sdpa_does(context):
    """SmolLM2's shape (random weights, bf16) at 16K and 32K: the split-K step under a CUDA graph, where it
    once faulted (an illegal memory access at the first warm-up step after the prefill, in some runs), decodes
    the tokens SDPA decodes (random weights leave near-ties, so nearly all, not all)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from decode_bench import random_weights_like, shape_model

    from attnprobe.analyses.efficiency.decoding import measure_decoding

    model = random_weights_like(shape_model("smollm2", "cuda", torch.bfloat16), context)
    runs = {attention: measure_decoding(model, None, [], context, new_tokens=8, batch=2, graph=True, attention=attention)
            for attention in ("sdpa", "split-k")}
    assert runs["split-k"]["decode_mode"] == "cuda-graph"
    assert (runs["split-k"]["tokens"] == runs["sdpa"]["tokens"]).float().mean() >= 0.9
