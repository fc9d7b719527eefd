"""The strong softmax baseline: the original model decoding with the split-K kernel (hooks/decode_attention.py)
gives the logits and greedy tokens of transformers' SDPA, and its step's bytes are what the cache holds."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from attnprobe.analyses.efficiency.bandwidth import bound_columns, hbm_peak, step_bytes, weight_bytes
from attnprobe.analyses.efficiency.decoding import measure_decoding
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import make_backend
from attnprobe.hooks.cache import StaticStep, architecture_cache
from attnprobe.hooks.decode_attention import IMPLEMENTATIONS, static_attention
from attnprobe.hooks.swap import kernel_edit
from attnprobe.kernels.registry import make_kernel


def decode_logits(model, prompt, steps, cache, positions: bool):
    """Prefill `prompt`, then `steps` greedy steps; the logits of each step's last position (B, steps + 1, V)."""
    out = model.hf(input_ids=prompt, cache=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for i in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        position = torch.full_like(token, prompt.shape[1] + i) if positions else None
        logits.append(model.hf(input_ids=token, cache=cache, position_ids=position, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


@torch.no_grad()
@pytest.mark.parametrize("decode", ["sdpa", "split-k"])
def test_static_decoding_equals_sdpa_over_a_dynamic_cache(tiny_llama_model, decode):
    """The flash prefill over the call's own keys and either decode step over a StaticCache's buffers give the
    logits transformers gives through a DynamicCache."""
    model = tiny_llama_model
    prompt = torch.randint(3, 100, (3, 70), generator=torch.Generator().manual_seed(1))
    want = decode_logits(model, prompt, 6, DynamicCache(config=model.hf.config), positions=False)
    with static_attention(model, decode):
        assert model.hf.config._attn_implementation == IMPLEMENTATIONS[decode][0]
        got = decode_logits(model, prompt, 6, StaticCache(config=model.hf.config, max_cache_len=90), positions=True)
    assert model.hf.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_split_k_refuses_what_it_cannot_decode(tiny_llama_model):
    model = tiny_llama_model
    prompt = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    with static_attention(model, "split-k"):
        cache = StaticCache(config=model.hf.config, max_cache_len=30)
        model.hf(input_ids=prompt, cache=cache, use_cache=True)
        with pytest.raises(AttnprobeError, match="from position 0 only"):
            model.hf(input_ids=prompt, cache=cache, use_cache=True)
    with pytest.raises(AttnprobeError, match="choose among sdpa, split-k"):
        with static_attention(model, "flash"):
            pass
    with pytest.raises(AttnprobeError, match="no edits, graph=True"):
        measure_decoding(model, None, [], 40, new_tokens=4, attention="split-k")
    with pytest.raises(AttnprobeError, match="build the cache for the whole context"):
        StaticStep(model, [], cache, torch.zeros(1, 1, dtype=torch.long), 30)  # a step past the 30 positions held


def test_the_baseline_decodes_the_tokens_sdpa_decodes_and_moves_the_cache_it_holds(tiny_llama_model):
    model = tiny_llama_model
    sdpa = measure_decoding(model, None, [], 60, new_tokens=10, batch=2, graph=True)
    split = measure_decoding(model, None, [], 60, new_tokens=10, batch=2, graph=True, attention="split-k")
    assert torch.equal(split["tokens"], sdpa["tokens"]) and split["attention"] == "split-k"
    info = model.info
    cache = 2 * 2 * info.n_layers * info.n_kv_heads * 60 * info.head_dim * 4  # batch, K and V, fp32, the static buffer
    assert split["kv_cache_bytes_measured"] == cache
    assert split["step_bytes"] == weight_bytes(model) + cache
    params = sum(p.numel() for p in model.hf.parameters())
    tied = model.hf.config.tie_word_embeddings
    assert weight_bytes(model) == 4 * (params - (0 if tied else model.hf.get_input_embeddings().weight.numel()))


def test_a_recurrent_state_counts_read_and_written_and_a_window_read_only(tiny_llama_model):
    model = tiny_llama_model
    backend = make_backend("native", model)
    torch.manual_seed(3)
    for name, rewritten in (("gated-deltanet", 1), ("sink+window", 0)):
        options = {"window": 4, "sinks": 2} if name == "sink+window" else {}
        edits = [kernel_edit(layer, range(4), make_kernel(name, 4, 16, **options)) for layer in range(3)]
        measured = measure_decoding(model, backend, edits, 30, new_tokens=3, warmup=1)
        cache = architecture_cache(model, edits)
        states = measured["kv_cache_bytes_measured"]  # no kept KV head: the states are the whole cache
        assert cache.kv_bytes() == 0 and measured["step_bytes"] == weight_bytes(model) + states * (1 + rewritten)
    assert step_bytes(model, architecture_cache(model, [])) == weight_bytes(model)  # an empty cache reads nothing


def test_the_bound_columns_follow_from_bytes_and_speed():
    row = {"batch": 8, "decode_tokens_per_s": 8000.0, "step_bytes": 4.8e9}
    columns = bound_columns(row, hbm_peak("NVIDIA H200"))
    assert columns["step_ms"] == pytest.approx(1.0) and columns["bound_ms"] == pytest.approx(1.0)
    assert columns["hbm_share"] == pytest.approx(1.0) and hbm_peak("NVIDIA H100 80GB HBM3") == 3.35e12
    assert "hbm_share" not in bound_columns(row, hbm_peak("cpu"))
