"""Swapping heads of a tiny random GQA Llama for kernels: logits, fitting, generation, saved fits."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from attnprobe.hooks.backends import make_backend
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model, describe
from attnprobe.hooks.swap import collect_teacher, fit_heads, kernel_edit, swap_edits
from attnprobe.kernels.fit import MANIFEST_FILE, fit_kernels, head_errors, load_fit, save_fit
from attnprobe.kernels.registry import make_kernel


class TinyTokenizer:
    bos_token_id = 1

    def __call__(self, text):
        return SimpleNamespace(input_ids=[1] + [2 + ord(c) % 90 for c in text])


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a large init range makes attention peaked, so kernels visibly differ from softmax
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         initializer_range=0.15)
    hf = LlamaForCausalLM(config).eval()
    hf.requires_grad_(False)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    tokenizer = TinyTokenizer()
    model = Model(hf, tokenizer, describe(hf, tokenizer, "tiny", "0" * 64, "test"))
    backend = make_backend("native", model)
    yield model, backend
    backend.close()


def random_ids(batch, length, seed):
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturbed(name, heads, head_dim=16, **options):
    kernel = make_kernel(name, heads, head_dim, **options)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in kernel.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return kernel


def test_softmax_replacement_reproduces_logits(tiny):
    model, backend = tiny
    ids = random_ids(2, 40, seed=0)
    base = backend.run(ids)
    for heads in (None, [1, 2]):
        swapped = backend.run(ids, edits=swap_edits(model, "softmax", layers=[0, 1], heads=heads))
        torch.testing.assert_close(swapped, base, atol=1e-5, rtol=0)


def test_elu_replacement_changes_logits(tiny):
    model, backend = tiny
    ids = random_ids(1, 40, seed=1)
    base = backend.run(ids)
    swapped = backend.run(ids, edits=swap_edits(model, "elu", layers=[1]))
    assert (swapped - base).abs().max() > 1e-2
    # only positions after the first are affected: one token attends to itself under any normalized kernel
    torch.testing.assert_close(swapped[:, 0], base[:, 0], atol=1e-5, rtol=0)


def test_teacher_matches_softmax_on_its_own_inputs(tiny):
    _, backend = tiny
    teachers = collect_teacher(backend, random_ids(2, 24, seed=2), [0, 1])
    for teacher in teachers.values():
        assert teacher.q.shape == teacher.k.shape == teacher.z.shape == (2, 4, 24, 16)
        assert teacher.scaling == pytest.approx(16 ** -0.5)
        assert head_errors(make_kernel("softmax", 4, 16), teacher).max() < 1e-10


def test_fitted_hedgehog_beats_unfitted_elu(tiny):
    _, backend = tiny
    teachers = collect_teacher(backend, random_ids(2, 64, seed=3), [0, 1])
    elu = fit_kernels("elu", teachers)
    start = fit_kernels("hedgehog", teachers, steps=0)
    fitted = fit_kernels("hedgehog", teachers, steps=40, lr=2e-2)
    for layer in teachers:
        elu_loss, start_loss, fitted_loss = (torch.tensor(r.losses[layer]) for r in (elu, start, fitted))
        assert fitted_loss.mean() < start_loss.mean()
        assert fitted_loss.mean() < elu_loss.mean()
        assert (fitted_loss < elu_loss).sum() >= 3  # most heads, each fitted on its own


GENERATION_KERNELS = [
    ("softmax", {}),
    ("hedgehog", {}),
    ("performer", {}),
    ("taylor", {"feature_dim": 4}),
    ("sink+window+linear", {"window": 4, "sinks": 2, "chunk": 8}),
    ("window+linear", {"window": 6, "chunk": 8}),
]


@pytest.mark.parametrize("name,options", GENERATION_KERNELS, ids=[name for name, _ in GENERATION_KERNELS])
def test_generation_decodes_from_state_like_the_quadratic_form(tiny, name, options):
    model, backend = tiny
    prompt, new = random_ids(1, 13, seed=4), 10
    layers, heads = [0, 1], [0, 3]
    kernels = {layer: perturbed(name, len(heads), **options) for layer in layers}
    stateful = [kernel_edit(layer, heads, kernels[layer]) for layer in layers]
    with backend.patched(stateful):
        out = model.hf.generate(prompt, max_new_tokens=new, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    sequence = out.sequences
    assert sequence.shape[1] == prompt.shape[1] + new
    assert all(edit.state["length"] == sequence.shape[1] - 1 for edit in stateful)  # decoded step by step
    reference = backend.run(sequence, edits=[kernel_edit(layer, heads, kernels[layer], recompute=True) for layer in layers])
    expected = reference[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(sequence[:, prompt.shape[1]:], expected.argmax(-1))
    if name != "softmax":
        assert (reference - backend.run(sequence)).abs().max() > 1e-3  # the swap is really on


SHARING_KERNELS = [("softmax", {}), ("sink+window", {"window": 4, "sinks": 2}),
                   ("sink+window+linear", {"window": 4, "sinks": 2, "chunk": 8}),
                   ("sink+window+gdn", {"window": 4, "sinks": 2, "chunk": 8}), ("oracle-topk", {"k": 4, "sinks": 1}),
                   ("quest", {"page": 4, "pages": 2}), ("power", {"block": 2, "window": 4, "sinks": 1})]


@pytest.mark.parametrize("name,options", SHARING_KERNELS, ids=[name for name, _ in SHARING_KERNELS])
def test_heads_of_one_kv_head_decode_from_one_copy_of_its_tokens(tiny, name, options, monkeypatch):
    """Heads 0 and 1 read KV head 0 and head 3 reads KV head 1: a state that keeps tokens keeps 2 rows of
    them, not 3, and generates what one copy per head generates (and, where decoding is the prefill's rule,
    what the quadratic form recomputes)."""
    from attnprobe.kernels.base import Kernel

    model, backend = tiny
    prompt, new, heads = random_ids(1, 13, seed=4), 8, [0, 1, 3]

    def generate():
        edits = [kernel_edit(layer, heads, perturbed(name, len(heads), **options)) for layer in (0, 1)]
        with backend.patched(edits):
            out = model.hf.generate(prompt, max_new_tokens=new, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        state = edits[0].state["kernel"]
        state = state[0] if isinstance(state, tuple) else state  # a mix: its exact part keeps the tokens
        stored = getattr(state, "window_k", None)
        return out, (state.k if stored is None else stored).shape[1]

    shared, rows = generate()
    with monkeypatch.context() as patch:
        patch.setattr(Kernel, "share_kv", lambda self, kv_heads: None)
        each, rows_each = generate()
    assert (rows, rows_each) == (2, 3)
    assert torch.equal(shared.sequences, each.sequences)
    torch.testing.assert_close(torch.stack(shared.logits, dim=1), torch.stack(each.logits, dim=1), atol=1e-6, rtol=1e-6)
    if name != "quest":  # quest's prefill is dense, its decode paged
        kernels = [perturbed(name, len(heads), **options) for _ in (0, 1)]
        reference = backend.run(shared.sequences, edits=[kernel_edit(layer, heads, kernels[layer], recompute=True) for layer in (0, 1)])
        torch.testing.assert_close(torch.stack(shared.logits, dim=1), reference[:, prompt.shape[1] - 1:-1], atol=1e-4, rtol=1e-4)


def test_recompute_refuses_a_kv_cache(tiny):
    model, backend = tiny
    edits = swap_edits(model, "elu", layers=[0], recompute=True)
    with backend.patched(edits), pytest.raises(AttnprobeError, match="use_cache=False"):
        model.hf.generate(random_ids(1, 5, seed=5), max_new_tokens=2, do_sample=False)


def test_saved_fit_round_trips(tiny, tmp_path):
    model, backend = tiny
    ids = random_ids(2, 32, seed=6)
    result = fit_heads(backend, ids, "window+linear", layers=[1], heads=[0, 2, 3], steps=5, window=8)
    save_fit(result, tmp_path / "fit", model.info.weights_sha256)
    manifest = json.loads((tmp_path / "fit" / MANIFEST_FILE).read_text())
    assert manifest["kernel"] == "window+linear" and manifest["heads"] == {"1": [0, 2, 3]}
    assert manifest["tokens"] == 64 and manifest["steps"] == 5 and len(manifest["final_loss"]["1"]) == 3
    loaded = load_fit(tmp_path / "fit", model.info.weights_sha256)
    assert loaded.options["window"] == 8
    for key, value in result.kernels[1].state_dict().items():
        assert torch.equal(loaded.kernels[1].state_dict()[key], value)
    assert loaded.losses == result.losses
    fresh = backend.run(ids, edits=swap_edits(model, result, heads=[3, 0]))
    torch.testing.assert_close(backend.run(ids, edits=swap_edits(model, loaded, heads=[3, 0])), fresh)
    with pytest.raises(AttnprobeError, match="refit"):
        load_fit(tmp_path / "fit", "f" * 64)


def test_swap_errors_say_how_to_fix(tiny, tmp_path):
    model, backend = tiny
    with pytest.raises(AttnprobeError, match="out of range"):
        swap_edits(model, "elu", layers=[5])
    with pytest.raises(AttnprobeError, match="choose among"):
        swap_edits(model, "elu", layers=[0], heads=[4])
    with pytest.raises(AttnprobeError, match="unknown kernel"):
        swap_edits(model, "softermax", layers=[0])
    fitted = fit_kernels("elu", collect_teacher(backend, random_ids(1, 8, seed=7), [0]), heads={0: [1]})
    with pytest.raises(AttnprobeError, match="not available"):
        swap_edits(model, fitted, heads=[2])
    with pytest.raises(AttnprobeError, match="not fitted"):
        swap_edits(model, fitted, layers=[1])
    with pytest.raises(AttnprobeError, match="no fitted kernel"):
        load_fit(tmp_path)


def test_decode_rebuilds_a_state_that_missed_the_prefill():
    """A decode step whose kernel state missed the prefill rebuilds it from the KV cache, exactly."""
    from attnprobe.hooks.backends.native import NativeBackend
    from attnprobe.hooks.swap import swap_edits
    from test_effective_attention import _tiny

    model = _tiny()
    backend = NativeBackend(model)
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        for name in ("hedgehog", "sink+window+linear"):
            edits = swap_edits(model, name, layers=[0, 1], window=4, sinks=1) if "window" in name else swap_edits(model, name, layers=[0, 1])
            with backend.patched(edits):
                cache = model.hf(input_ids=ids[:, :-1], use_cache=True).past_key_values
                for edit in edits:
                    edit.state.clear()  # the recurrent states are lost; the KV cache remains
                stepped = model.hf(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
                whole = model.hf(input_ids=ids, use_cache=False).logits[0, -1]
            assert torch.allclose(stepped, whole, atol=1e-4), name
