"""The three backends agree with plain transformers and with each other: logits, patterns, q/k/v/z,
residual sites, head edits. Each backend gets its own copy of the model (TransformerLens swaps
submodules in place, nnsight installs forward controllers)."""
from __future__ import annotations

import copy

import pytest
import torch

from attnprobe.hooks.backends import BACKENDS as TABLE
from attnprobe.hooks.backends import SiteNotFired, make_backend
from attnprobe.hooks.edits import Edit, replace_heads, uniform_heads, zero_heads
from attnprobe.errors import AttnprobeError
from attnprobe.kernels.attention_stats import allowed_keys as causal_allowed
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site
from tiny_hf import TinyTokenizer, tiny_gemma3, tiny_llama, wrap

BACKENDS = list(TABLE)  # every registered backend is held to plain HF and to the native one
OTHERS = [name for name in BACKENDS if name != "native"]


class Case:
    """One model, one prompt, the plain-HF references, and one backend per name on its own copy."""

    def __init__(self, hf, tokenizer, ids, atol, rtol=0.0):
        self.hf, self.tokenizer, self.ids, self.atol, self.rtol = hf, tokenizer, ids, atol, rtol
        with torch.no_grad():
            self.logits = hf(input_ids=ids).logits.float()
            eager = copy.deepcopy(hf)
            eager.set_attn_implementation("eager")
            self.attentions = [a.float() for a in eager(input_ids=ids, output_attentions=True).attentions]
        del eager
        self.info = wrap(hf, tokenizer).info
        self._backends = {}

    def backend(self, name):
        if name not in self._backends:
            self._backends[name] = make_backend(name, wrap(copy.deepcopy(self.hf), self.tokenizer))
        return self._backends[name]


def tiny_case() -> Case:
    torch.manual_seed(1)
    return Case(tiny_llama(), TinyTokenizer(), torch.randint(3, 100, (2, 16)), atol=1e-5)


def smollm2_case() -> Case:
    from attnprobe.hooks.model import load_model

    model = load_model("smollm2-135m", device="cpu")
    ids = torch.tensor([model.tokenizer("The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire.").input_ids])
    # fp32 through 30 layers: logits move by ~6e-5 between SDPA, chunked and eager attention, and the
    # residual stream (massive activations near 2e4) by up to 2e-7 of its largest entry.
    return Case(model.hf, model.tokenizer, ids, atol=1e-4, rtol=1e-6)


@pytest.fixture(scope="module", params=["tiny-llama", pytest.param("smollm2", marks=pytest.mark.real_model)])
def case(request):
    return tiny_case() if request.param == "tiny-llama" else smollm2_case()


def assert_near(got, want, case, what=""):
    """Max difference within atol + rtol x the tensor's largest entry (residuals hold massive activations)."""
    assert got.shape == want.shape, what
    error, bound = float((got - want).abs().max()), case.atol + case.rtol * float(want.abs().max())
    assert error <= bound, f"{what}: max difference {error:.2e} > {bound:.2e}"


def keep_all(layers, sites):
    return {(layer, site): Keep() for layer in layers for site in sites}


def softmax_heads(call, heads, state):
    """Softmax attention of the chosen heads, recomputed from the AttentionCall (B, T, len(heads), d)."""
    k, v = call.repeated_kv()
    scores = call.q[:, heads].float() @ k[:, heads].float().transpose(-1, -2) * call.scaling
    allowed = causal_allowed(call.query_positions, k.shape[2], call.window)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v[:, heads].float()).transpose(1, 2)


@pytest.mark.parametrize("name", BACKENDS)
def test_logits_match_plain_transformers(case, name):
    logits = case.backend(name).run(case.ids)
    assert logits.shape == case.logits.shape
    assert_near(logits, case.logits, case)


@pytest.mark.parametrize("name", BACKENDS)
def test_pattern_matches_eager_attention(case, name):
    layers = range(case.info.n_layers)
    reads = keep_all(layers, [Site.PATTERN])
    case.backend(name).run(case.ids, reads)
    for layer in layers:
        pattern = reads[(layer, Site.PATTERN)].result()
        assert_near(pattern, case.attentions[layer], case)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", OTHERS)
def test_every_site_matches_native(case, name):
    layers = [0, case.info.n_layers - 1]
    reference, reads = keep_all(layers, list(Site)), keep_all(layers, list(Site))
    case.backend("native").run(case.ids, reference)
    case.backend(name).run(case.ids, reads)
    batch, length = case.ids.shape
    info = case.info
    shapes = {Site.Q: (batch, info.n_heads, length, info.head_dim), Site.K: (batch, info.n_kv_heads, length, info.head_dim),
              Site.V: (batch, info.n_kv_heads, length, info.head_dim), Site.Z: (batch, length, info.n_heads, info.head_dim),
              Site.PATTERN: (batch, info.n_heads, length, length)}
    for (layer, site), reducer in reads.items():
        got = reducer.result()
        assert got.shape == shapes.get(site, (batch, length, info.d_model)), (layer, site)
        assert_near(got, reference[(layer, site)].result(), case, f"{layer} {site}")


@pytest.mark.parametrize("name", BACKENDS)
def test_head_edits_agree(case, name):
    layer = case.info.n_layers // 2
    backend, native = case.backend(name), case.backend("native")
    zeroed = backend.run(case.ids, edits=[zero_heads(layer, 1)])
    assert_near(zeroed, native.run(case.ids, edits=[zero_heads(layer, 1)]), case)
    assert (zeroed - case.logits).abs().max() > 1e-3
    uniform = backend.run(case.ids, edits=[uniform_heads(layer, [0, 2])])
    assert_near(uniform, native.run(case.ids, edits=[uniform_heads(layer, [0, 2])]), case)
    assert (uniform - case.logits).abs().max() > 1e-4
    # Replacing heads by softmax recomputed from the call gives back the model: the call holds the true q, k, v.
    recomputed = backend.run(case.ids, edits=[replace_heads(layer, [0, 1], softmax_heads)])
    assert_near(recomputed, case.logits, case)


@pytest.mark.parametrize("name", BACKENDS)
def test_replaced_heads_show_their_own_attention_to_pattern_reads(case, name):
    def uniform_rows(call, rows):
        allowed = causal_allowed(rows, call.k.shape[2], call.window).float()
        return (allowed / allowed.sum(-1, keepdim=True)).expand(call.q.shape[0], 2, -1, -1)

    edit = replace_heads(1, [0, 2], softmax_heads)
    edit.pattern_fn = uniform_rows
    reads = {(1, Site.PATTERN): Keep()}
    logits = case.backend(name).run(case.ids, reads, edits=[edit])
    assert_near(logits, case.logits, case)
    pattern = reads[(1, Site.PATTERN)].result()
    assert_near(pattern[:, [1, 3]], case.attentions[1][:, [1, 3]], case)
    causal = torch.ones(case.ids.shape[1], case.ids.shape[1]).tril()
    assert_near(pattern[:, [0, 2]], (causal / causal.sum(-1, keepdim=True)).expand_as(pattern[:, [0, 2]]), case)


@pytest.mark.parametrize("name", BACKENDS)
def test_identity_edits_leave_logits_unchanged(case, name):
    seen = []

    def identity(tensor, call):
        seen.append(tensor.shape)
        return tensor

    edits = [Edit(1, site, identity) for site in Site if site != Site.PATTERN or name == "transformer-lens"]
    logits = case.backend(name).run(case.ids, edits=edits)
    assert len(seen) == len(edits)
    assert_near(logits, case.logits, case)


@pytest.mark.parametrize("name", OTHERS)
@pytest.mark.parametrize("site", [site for site in Site if site != Site.PATTERN])
def test_an_edit_at_each_site_agrees_with_native(case, name, site):
    def halve_first_slice(tensor, call):
        tensor = tensor.clone()
        tensor[:, :1] *= 0.5  # first head (q, k, v) or first position (z and residual sites)
        return tensor

    edit = Edit(1, site, halve_first_slice)
    logits = case.backend(name).run(case.ids, edits=[edit])
    assert_near(logits, case.backend("native").run(case.ids, edits=[edit]), case)
    assert (logits - case.logits).abs().max() > 1e-4


@pytest.mark.parametrize("name", BACKENDS)
def test_out_of_range_layer_and_unknown_site_raise(case, name):
    backend = case.backend(name)
    with pytest.raises(AttnprobeError, match="out of range"):
        backend.run(case.ids, {(case.info.n_layers, Site.Q): Keep()})
    with pytest.raises(AttnprobeError, match="unknown site"):
        backend.run(case.ids, {(0, "q"): Keep()})


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("site", [Site.RESID_POST, Site.Q, Site.PATTERN, Site.Z])
def test_site_that_never_fires_raises(name, site):
    hf = tiny_llama()
    backend = make_backend(name, wrap(hf, TinyTokenizer()))
    del hf.model.layers[2]  # the last layer is still described but never runs
    with pytest.raises(SiteNotFired):
        backend.run(torch.randint(3, 100, (1, 8)), {(1, Site.RESID_POST): Keep(), (2, site): Keep()})


@pytest.mark.parametrize("name", OTHERS)
def test_close_gives_the_model_back(name):
    hf = tiny_llama()
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        before = hf(input_ids=ids).logits

    def layout():
        return [(type(m), sorted(m.__dict__), sorted(m._parameters), sorted(m._buffers)) for m in hf.modules()]

    original = layout()
    backend = make_backend(name, wrap(hf, TinyTokenizer()))
    backend.run(ids, {(1, Site.PATTERN): Keep(), (2, Site.Z): Keep()})
    assert layout() != original
    backend.close()
    assert layout() == original
    assert hf.config._attn_implementation == "sdpa"
    native = make_backend("native", wrap(hf, TinyTokenizer()))
    reads = {(2, Site.PATTERN): Keep()}
    torch.testing.assert_close(native.run(ids, reads), before, atol=1e-5, rtol=0)
    assert reads[(2, Site.PATTERN)].fired


def test_expanded_kv_heads_give_the_grouped_sdpa_numbers(monkeypatch):
    """The float32 CUDA prefill hands SDPA repeated KV heads instead of `enable_gqa` (see expand_kv_heads):
    forced on here, the untouched layers' output equals plain transformers' grouped SDPA."""
    from attnprobe.hooks.backends import native

    hf, ids = tiny_llama(), torch.randint(3, 100, (2, 16))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    assert not native.expand_kv_heads(torch.zeros(1, 4, 16, 16), torch.zeros(1, 2, 16, 16), None)  # CPU: its own kernels
    expanded = []

    def everywhere(query, key, mask):
        expanded.append(key.shape[1] < query.shape[1] and query.shape[2] > 1 and mask is None)
        return expanded[-1]

    monkeypatch.setattr(native, "expand_kv_heads", everywhere)
    got = make_backend("native", wrap(hf, TinyTokenizer())).run(ids)
    assert expanded and all(expanded)  # every layer took the expanded form
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_nnsight_refuses_pattern_edits():
    backend = make_backend("nnsight", wrap(tiny_llama(), TinyTokenizer()))
    with pytest.raises(AttnprobeError, match="transformer-lens"):
        backend.run(torch.randint(3, 100, (1, 8)), edits=[Edit(0, Site.PATTERN, lambda p, call: p)])


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(2)
    return Case(tiny_gemma3(), TinyTokenizer(), torch.randint(3, 100, (1, 12)), atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_gemma3_sliding_window(gemma, name):
    layers = range(gemma.info.n_layers)
    reads = keep_all(layers, [Site.PATTERN])
    logits = gemma.backend(name).run(gemma.ids, reads)
    assert_near(logits, gemma.logits, gemma)
    window = gemma.hf.config.sliding_window
    beyond = torch.ones(12, 12).tril(-window).bool()  # query i, key j with i - j >= window
    for layer in layers:
        pattern = reads[(layer, Site.PATTERN)].result()
        assert_near(pattern, gemma.attentions[layer], gemma)
        mass_beyond = pattern[..., beyond].abs().max()
        if gemma.info.window(layer) is None:
            assert mass_beyond > 1e-3
        else:
            assert mass_beyond == 0
    zeroed = gemma.backend(name).run(gemma.ids, edits=[zero_heads(2, 3)])
    assert_near(zeroed, gemma.backend("native").run(gemma.ids, edits=[zero_heads(2, 3)]), gemma)
