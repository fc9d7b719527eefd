"""The architecture-shaped KV cache: greedy decoding through it equals decoding through transformers'
DynamicCache for every kernel kind, and the bytes it holds are exactly what the architecture needs."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from attnprobe.hooks.backends import make_backend
from attnprobe.hooks.cache import ArchitectureCache, architecture_cache, kept_kv_heads
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.reducers import PatternStats
from attnprobe.hooks.sites import Site
from attnprobe.hooks.swap import kernel_edit
from attnprobe.kernels.hybrid import HybridKernel
from attnprobe.kernels.linear import LinearKernel
from attnprobe.kernels.registry import make_kernel

NEW_TOKENS = 9
SMALL = {"sink+window": dict(window=4, sinks=2), "window+linear": dict(window=4),
         "sink+window+linear": dict(window=4, sinks=2), "sink+window+gdn": dict(window=4, sinks=2)}  # windows the prompt outgrows, so eviction is exercised
# name -> {layer: (kernel, heads)}; the tiny Llama has 4 query heads on 2 KV heads (0,1 -> 0; 2,3 -> 1)
ARCHITECTURES = {
    "softmax-kept": {1: ("hedgehog", [0, 2])},  # both KV heads still serve a softmax head
    "linear": {0: ("hedgehog", [0, 1, 2, 3]), 1: ("elu", [0, 1, 2, 3]), 2: ("hedgehog", [0, 1, 2, 3])},
    "window": {layer: ("window+linear", [0, 1, 2, 3]) for layer in range(3)},
    "sink+window": {layer: ("sink+window", [0, 1, 2, 3]) for layer in range(3)},
    "sink+window+linear": {0: ("sink+window+linear", [0, 1, 2, 3])},
    "mixed": {0: ("hedgehog", [0, 1]), 1: ("sink+window", [2, 3]), 2: ("elu", [1])},  # some heads softmax per layer
    "two-kernels-one-layer": {0: [("hedgehog", [0, 1]), ("sink+window", [2, 3])]},
    "gla": {layer: ("gla", [0, 1, 2, 3]) for layer in range(3)},
    "decay": {0: ("decay", [0, 1, 2, 3])},
    "gated-deltanet": {0: ("gated-deltanet", [0, 1, 2, 3]), 1: ("deltanet", [2, 3])},
    "sink+window+gdn": {1: ("sink+window+gdn", [0, 1, 2, 3])},
}


def edits_for(model, architecture):
    torch.manual_seed(5)
    edits = []
    for layer, entries in ARCHITECTURES[architecture].items():
        for name, heads in entries if isinstance(entries, list) else [entries]:
            kernel = make_kernel(name, len(heads), model.info.head_dim, **SMALL.get(name, {}))
            edits.append(kernel_edit(layer, heads, kernel))
    return edits


def greedy(model, backend, edits, prompt, cache):
    with backend.patched(edits):
        out = model.hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, cache=cache,
                                output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def expected_state_numbers(kernel, length: int, kv_heads: int) -> int:
    """Numbers a kernel's state holds after `length` tokens, as the kernel describes itself (fp32 each): its
    fixed state and the one reference log-scale per head that a feature-map state keeps beside S and n
    (LinearState.ref), plus K and V of the tokens it keeps (sinks and window) once for each of the
    `kv_heads` KV heads its heads read."""
    d = kernel.head_dim
    cached = min(length, kernel.cached_tokens)
    log_scale = isinstance(kernel, LinearKernel) or (isinstance(kernel, HybridKernel) and kernel.feature_map is not None)
    return kernel.n_heads * (kernel.state_numbers(d) + int(log_scale)) + kv_heads * 2 * d * cached


def expected_bytes(model, edits, length: int, batch: int) -> int:
    info = model.info
    group = info.n_heads // info.n_kv_heads
    element = next(model.hf.parameters()).element_size()
    replaced = {}
    for edit in edits:
        replaced.setdefault(edit.layer, set()).update(edit.heads)
    kv = sum(len(kept_kv_heads(info.n_heads, info.n_kv_heads, replaced.get(layer, set()))) for layer in range(info.n_layers))
    states = sum(4 * expected_state_numbers(e.kernel, length, len({h // group for h in e.heads})) for e in edits)
    return batch * (kv * 2 * length * info.head_dim * element + states)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_greedy_decoding_through_the_architecture_cache_equals_the_dynamic_cache(tiny_llama_model, architecture):
    model = tiny_llama_model
    backend = make_backend("native", model)
    prompt = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(7))
    edits = edits_for(model, architecture)
    want_ids, want_logits = greedy(model, backend, edits, prompt, DynamicCache(config=model.hf.config))
    cache = architecture_cache(model, edits)
    got_ids, got_logits = greedy(model, backend, edits, prompt, cache)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    decode_paths = {layer for (layer, path), n in backend.paths.items() if path == "compact-decode"}
    assert decode_paths == {e.layer for e in edits}  # every swapped layer decoded from its compact cache
    length = cache.get_seq_length()
    assert length == prompt.shape[1] + NEW_TOKENS - 1
    assert cache.nbytes() == expected_bytes(model, edits, length, prompt.shape[0])


@pytest.mark.parametrize("architecture, kernel", [("sink+window", "sink+window"), ("window", "window+linear")])
def test_the_matrix_columns_count_what_the_cache_holds(tiny_llama_model, architecture, kernel):
    """Under GQA (4 query heads on 2 KV heads) the windowed heads of one KV head keep its sinks and window
    once: the matrix's computed fixed bytes equal the measured cache after decoding past the window (a
    feature-map state's one log-scale number per head aside)."""
    from attnprobe.analyses.experiments.architectures import cache_bytes_per_token

    model = tiny_llama_model
    backend = make_backend("native", model)
    edits = edits_for(model, architecture)
    cache = architecture_cache(model, edits)
    greedy(model, backend, edits, torch.randint(3, 100, (1, 13), generator=torch.Generator().manual_seed(7)), cache)
    element = next(model.hf.parameters()).element_size()
    per_token, fixed = cache_bytes_per_token(model, set(), kernel, bytes_per_value=element, **SMALL[kernel])
    log_scales = 4 * sum(len(e.heads) for e in edits) if kernel == "window+linear" else 0
    assert per_token == 0 and cache.nbytes() == fixed + log_scales


def test_dropped_heads_hold_no_keys_and_the_original_holds_what_a_dynamic_cache_does(tiny_llama_model):
    model = tiny_llama_model
    backend = make_backend("native", model)
    prompt = torch.randint(3, 100, (1, 60), generator=torch.Generator().manual_seed(8))
    dynamic = DynamicCache(config=model.hf.config)
    greedy(model, backend, [], prompt, dynamic)
    original = architecture_cache(model, [])
    greedy(model, backend, [], prompt, original)
    dynamic_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in dynamic.layers)
    assert original.nbytes() == dynamic_bytes == expected_bytes(model, [], dynamic.get_seq_length(), 1)
    edits = edits_for(model, "linear")
    linear = architecture_cache(model, edits)
    greedy(model, backend, edits, prompt, linear)
    assert linear.kv_bytes() == 0 and all(layer.keys.shape[1] == 0 for layer in linear.layers)
    assert 0 < linear.state_bytes() < dynamic_bytes


def test_sliding_layers_of_gemma3_keep_their_window_for_their_softmax_heads(tiny_gemma3_model):
    model = tiny_gemma3_model
    backend = make_backend("native", model)
    prompt = torch.randint(3, 100, (1, 11), generator=torch.Generator().manual_seed(9))
    torch.manual_seed(6)
    edits = [kernel_edit(0, [0, 1], make_kernel("hedgehog", 2, 16)), kernel_edit(1, [3], make_kernel("elu", 1, 16))]
    want = greedy(model, backend, edits, prompt, DynamicCache(config=model.hf.config))
    cache = architecture_cache(model, edits)
    got = greedy(model, backend, edits, prompt, cache)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    # both equal the whole sequence recomputed (a replaced head in a sliding layer continues its own state,
    # it is not rebuilt from the window the sliding cache kept)
    recomputed = [kernel_edit(e.layer, e.heads, e.kernel, recompute=True) for e in edits]
    reference = backend.run(got[0], edits=recomputed)[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(got[1], reference, atol=1e-4, rtol=1e-4)
    assert cache.layers[0].keys.shape[1:3] == (1, 3)  # KV head 1 only, the window (4) less one
    assert cache.layers[1].keys.shape[1] == 2  # head 3 replaced: its KV head still serves head 2


def test_pattern_reads_need_every_key_and_the_cache_needs_its_edits(tiny_llama_model):
    model = tiny_llama_model
    backend = make_backend("native", model)
    prompt = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(10))
    edits = edits_for(model, "mixed")
    with pytest.raises(AttnprobeError, match="DynamicCache"):
        with backend.patched(edits, reads={(0, Site.PATTERN): PatternStats(track_argmax=True)}):
            model.hf.generate(prompt, max_new_tokens=2, do_sample=False, cache=architecture_cache(model, edits))
    with pytest.raises(AttnprobeError, match="patched"):
        model.hf.generate(prompt, max_new_tokens=2, do_sample=False, cache=architecture_cache(model, edits))
    with pytest.raises(AttnprobeError, match="one kernel"):
        architecture_cache(model, edits + edits)
    assert isinstance(architecture_cache(model, edits), ArchitectureCache)



def test_the_backend_keeps_no_reference_to_a_finished_cache(tiny_llama_model):
    """A generate's cache is freed when it ends: the next measurement's peak memory does not carry it."""
    import gc
    import weakref

    model = tiny_llama_model
    backend = make_backend("native", model)
    edits = edits_for(model, "mixed")
    cache = architecture_cache(model, edits)
    greedy(model, backend, edits, torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(12)), cache)
    alive = weakref.ref(cache)
    del cache
    gc.collect()
    assert alive() is None and backend.cache is None


@pytest.mark.parametrize("name", ["sink+window", "sink+window+linear", "window+linear"])
@pytest.mark.parametrize("prefilled", [1, 3, 4, 9, 16])
@pytest.mark.parametrize("group_scores", [1 << 20, 500])
def test_blocked_prefill_and_ring_buffer_steps_equal_the_quadratic_reference(name, prefilled, group_scores, monkeypatch):
    """The prefill in blocks of `window` (in one group, or in groups of two blocks) and decode steps that
    overwrite the window's oldest slot in place give what the full quadratic form gives, for prompts
    shorter than, equal to and past the window, and a window that wraps several times."""
    from attnprobe.kernels.hybrid import kernel as hybrid

    monkeypatch.setattr(hybrid, "GROUP_SCORES_CPU", group_scores)
    torch.manual_seed(3)
    options = {"window": 4, **({"sinks": 2} if "sink" in name else {})}
    kernel = make_kernel(name, 3, 8, **options)
    q, k, v = (torch.randn(2, 3, 23, 8) for _ in range(3))
    want = kernel.quadratic(q, k, v, 0.4)
    z, state = kernel.prefill(q[:, :, :prefilled], k[:, :, :prefilled], v[:, :, :prefilled], 0.4)
    torch.testing.assert_close(z, want[:, :, :prefilled], atol=1e-5, rtol=1e-5)
    steps = []
    for t in range(prefilled, 23):
        out, state = kernel.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.4)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=2), want[:, :, prefilled:], atol=1e-5, rtol=1e-5)
    assert state.window_k.shape[2] == 4 and state.sink_k.shape[2] == options.get("sinks", 0)
    # the ring holds the last `window` keys, position p in slot p % window
    for position in range(19, 23):
        assert torch.equal(state.window_k[:, :, position % 4], k[:, :, position])


ROUTES = {"gated-deltanet": "fla", "deltanet": "fla", "gla": "fla", "decay": "fla", "kda": "torch", "hedgehog": "torch"}


@pytest.mark.parametrize("name", list(ROUTES))
def test_decode_takes_the_torch_step_on_cpu_and_fla_fused_recurrent_ops_where_fla_runs(name, monkeypatch):
    from attnprobe.kernels import dispatch
    from attnprobe.hooks.swap import DECODERS, decode_route

    torch.manual_seed(4)
    kernel = make_kernel(name, 2, 8)
    q, k, v = (torch.randn(1, 2, 7, 8) for _ in range(3))
    assert decode_route(kernel, q, v) == "torch"  # fla's ops do not run on CPU tensors
    _, state = kernel.prefill(q[:, :, :4], k[:, :, :4], v[:, :, :4], 0.3)
    z, _ = DECODERS["torch"](kernel, state, q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], 0.3)
    torch.testing.assert_close(z, kernel.quadratic(q, k, v, 0.3)[:, :, 4:], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(dispatch, "use_fla", lambda x: True)  # as on CUDA with fla-core installed
    assert decode_route(kernel, q, v) == ROUTES[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's fused recurrent ops run on CUDA")
@pytest.mark.parametrize("name", [n for n, route in ROUTES.items() if route == "fla"])
def test_fla_fused_recurrent_decode_equals_the_torch_step_on_cuda(name):
    from attnprobe.hooks.swap import DECODERS, decode_route

    torch.manual_seed(4)
    kernel = make_kernel(name, 2, 64).cuda()
    q, k, v = (torch.randn(2, 2, 40, 64, device="cuda") for _ in range(3))
    assert decode_route(kernel, q, v) == "fla"
    _, state = kernel.prefill(q[:, :, :32], k[:, :, :32], v[:, :, :32], 0.125)
    want, want_state = DECODERS["torch"](kernel, state.clone(), q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], 0.125)
    got, got_state = DECODERS["fla"](kernel, state.clone(), q[:, :, 32:], k[:, :, 32:], v[:, :, 32:], 0.125)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got_state, want_state, atol=2e-3, rtol=2e-3)


EVERY = [0, 1, 2, 3]
STATIC = {"original": [], "all-hedgehog": [(layer, "hedgehog", EVERY) for layer in range(3)],
          "all-gated-deltanet": [(layer, "gated-deltanet", EVERY) for layer in range(3)],
          "mixed-families": [(0, "gla", EVERY), (1, "decay", EVERY), (2, "hedgehog", EVERY)],
          "layer-hybrid": [(0, "gated-deltanet", EVERY), (2, "kda", EVERY)],  # layer 1 softmax
          "head-hybrid": [(0, "gated-deltanet", [2, 3]), (1, "gated-deltanet", [1, 2, 3]), (2, "hedgehog", EVERY)],
          "sink+window": [(layer, "sink+window", EVERY) for layer in range(3)],  # the ring's slot on the device
          "sink+window+gdn": [(0, "sink+window+gdn", EVERY), (1, "sink+window", [2, 3]), (2, "kda", EVERY)]}


def static_edits(model, architecture):
    torch.manual_seed(6)
    return [kernel_edit(layer, heads, make_kernel(name, len(heads), model.info.head_dim, **SMALL.get(name, {})))
            for layer, name, heads in STATIC[architecture]]


@pytest.mark.parametrize("architecture", list(STATIC))
def test_static_decode_steps_equal_eager_decoding(tiny_llama_model, architecture):
    """The step a CUDA graph replays (token and position buffers, states copied back in place, the original
    over a StaticCache, softmax heads of a hybrid over a static ArchitectureCache read by the split-K kernel),
    run eagerly as on CPU, decodes the tokens the eager loop decodes, holding the same bytes."""
    from attnprobe.analyses.efficiency.decoding import measure_decoding

    model = tiny_llama_model
    edits = static_edits(model, architecture)
    backend = make_backend("native", model) if edits else None
    eager = measure_decoding(model, backend, edits, 40, new_tokens=12, batch=2, warmup=2)
    static = measure_decoding(model, backend, edits, 40, new_tokens=12, batch=2, warmup=2, graph=True)
    assert (eager["decode_mode"], static["decode_mode"]) == ("eager", "static")
    assert torch.equal(static["tokens"], eager["tokens"]) and static["tokens"].shape == (2, 12)
    assert static["kv_cache_bytes_measured"] == eager["kv_cache_bytes_measured"]


def test_a_static_architecture_cache_equals_the_dynamic_cache_and_counts_its_positions_on_the_device(tiny_llama_model):
    model = tiny_llama_model
    backend = make_backend("native", model)
    edits = static_edits(model, "head-hybrid")
    prompt = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(7))
    want_ids, want_logits = greedy(model, backend, edits, prompt, DynamicCache(config=model.hf.config))
    static = architecture_cache(model, edits, capacity=30)
    got_ids, got_logits = greedy(model, backend, edits, prompt, static)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    length = prompt.shape[1] + NEW_TOKENS - 1
    assert all(int(layer.filled) == length and layer.keys.shape[2] == 30 for layer in static.layers[:2])
    assert static.layers[2].kept == [] and static.layers[2].filled is None  # layer 2 all hedgehog: nothing kept
    assert static.layers[0].built_for_edits and not ArchitectureCache(model, [], 30).layers[0].built_for_edits
    with pytest.raises(AttnprobeError, match="does not fit a cache of 20 positions: build the cache for the whole context"):
        greedy(model, backend, edits, prompt, architecture_cache(model, edits, capacity=20))


def test_only_fixed_state_steps_are_captured(tiny_llama_model):
    from attnprobe.analyses.efficiency.decoding import measure_decoding
    from attnprobe.hooks.cache import StaticStep, graph_capturable

    model = tiny_llama_model
    backend = make_backend("native", model)
    whole = [kernel_edit(layer, range(4), make_kernel("hedgehog", 4, 16)) for layer in range(3)]
    token = torch.zeros(1, 1, dtype=torch.long)
    for edits in ([], whole, whole[:2], whole[:2] + [kernel_edit(2, [0, 1], make_kernel("hedgehog", 2, 16))]):
        assert graph_capturable(model, edits)  # softmax layers and heads read a static cache
    with pytest.raises(AttnprobeError, match="capacity=context"):
        StaticStep(model, whole[:2], architecture_cache(model, whole[:2]), token, 5)
    with pytest.raises(AttnprobeError, match="build the cache for the whole context"):
        StaticStep(model, whole[:2], architecture_cache(model, whole[:2], capacity=5), token, 5)
    edits = edits_for(model, "window")
    assert not graph_capturable(model, edits)  # evicted tokens folded into a linear state on the host's schedule
    with pytest.raises(AttnprobeError, match="decode this architecture eagerly"):
        StaticStep(model, edits, architecture_cache(model, edits), token, 5)
    with pytest.raises(AttnprobeError, match="decode this architecture eagerly"):
        measure_decoding(model, backend, edits, 40, new_tokens=4, graph=True)
    edits = edits_for(model, "sink+window")  # window 4 + 2 sinks: steady from 6 tokens on
    assert graph_capturable(model, edits)
    with pytest.raises(AttnprobeError, match="starts past 6 tokens, so prefill at least that many"):
        measure_decoding(model, backend, edits, 9, new_tokens=4, warmup=1, graph=True)


def test_a_model_with_sliding_layers_decodes_eagerly(tiny_gemma3_model):
    from attnprobe.hooks.cache import graph_capturable

    edits = [kernel_edit(layer, range(4), make_kernel("hedgehog", 4, 16)) for layer in range(2)]
    assert not graph_capturable(tiny_gemma3_model, edits)


def test_kept_keys_grow_by_doubling_or_fill_a_reserved_capacity(tiny_llama_model):
    """A decode step writes its own token into the kept heads' buffers (no copy of the cache per token):
    the buffers double when full, or (static) hold the capacity from the prefill on."""
    model = tiny_llama_model
    backend = make_backend("native", model)
    edits = edits_for(model, "softmax-kept")
    prompt = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(7))
    grown, reserved = architecture_cache(model, edits), architecture_cache(model, edits, capacity=40)
    want = greedy(model, backend, edits, prompt, grown)
    assert torch.equal(greedy(model, backend, edits, prompt, reserved)[0], want[0])
    length = prompt.shape[1] + NEW_TOKENS - 1
    layer = grown.layers[1]
    assert layer.buffers[0].shape[2] == 26 and layer.keys.shape[2] == length  # 13 -> 26 at the 14th position
    assert layer.keys.data_ptr() == layer.buffers[0].data_ptr()  # a view of the buffer
    assert reserved.layers[1].keys.shape[2] == 40  # static: the whole buffer, as a StaticCache holds it
    assert grown.nbytes() == reserved.nbytes() - 3 * 2 * (40 - length) * 2 * 16 * 4 * 2  # 3 layers x 2 KV heads, K and V, fp32, batch 2


@pytest.mark.parametrize("name", ["sink+window", "sink+window+gdn"])
def test_ring_steps_with_the_slot_on_the_device_equal_the_quadratic_form(name):
    """Before the window and sinks fill, the ring route is the kernel's own step; after, it writes the slot a
    device tensor names, in place, and reads sinks + window with the split-K kernel."""
    from attnprobe.hooks.swap import DECODERS, decode_route
    from attnprobe.kernels.hybrid.ring import ring_part, ring_steady

    torch.manual_seed(3)
    kernel = make_kernel(name, 3, 16, **SMALL[name])
    q, k, v = (torch.randn(2, 3, 21, 16) for _ in range(3))
    want = kernel.quadratic(q, k, v, 0.3)
    _, state = kernel.prefill(q[:, :, :3], k[:, :, :3], v[:, :, :3], 0.3)
    assert decode_route(kernel, q[:, :, :1], v[:, :, :1]) == "ring" and decode_route(kernel, q, v) != "ring"
    window = ring_part(kernel)
    steps, slots = [], []
    for t in range(3, 21):
        out, state = DECODERS["ring"](kernel, state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.3)
        ring = state[0] if isinstance(state, tuple) else state
        slots.append(None if ring.slot is None else int(ring.slot))
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=2), want[:, :, 3:], atol=1e-5, rtol=1e-5)
    assert ring_steady(window, ring) and slots[:3] == [None] * 3  # positions 3-5: not steady yet
    assert slots[3:] == [(p + 1) % 4 for p in range(6, 21)]  # after position p the next slot is (p + 1) % window
    for position in range(17, 21):
        assert torch.equal(ring.window_k[:, :, position % 4], k[:, :, position])


def allocated_bytes(cache: ArchitectureCache) -> int:
    """Bytes of the storage the cache's tensors actually occupy: each distinct storage once, whole (a view
    of a larger buffer costs that buffer, two views of one buffer cost it once)."""
    from attnprobe.hooks.cache import tensor_leaves

    layers = [leaf for layer in cache.layers if layer.is_initialized for leaf in tensor_leaves([layer.keys, layer.values])]
    states = [leaf for edit in cache.edits for leaf in tensor_leaves(edit.state.get("kernel"))]
    storages = {}
    for tensor in layers + states:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_nbytes_is_the_storage_the_cache_holds(tiny_llama_model, architecture):
    """What `nbytes` reports equals what the cache's tensors really occupy after decoding, for every kernel kind,
    when the cache is built for the whole context (as measurements build it); a cache grown by doubling holds at
    most twice what it reports."""
    model = tiny_llama_model
    backend = make_backend("native", model)
    edits = edits_for(model, architecture)
    prompt = torch.randint(3, 100, (2, 13), generator=torch.Generator().manual_seed(7))
    reserved = architecture_cache(model, edits, capacity=prompt.shape[1] + NEW_TOKENS - 1)
    greedy(model, backend, edits, prompt, reserved)
    assert reserved.nbytes() == allocated_bytes(reserved)
    grown = architecture_cache(model, edits)
    greedy(model, backend, edits, prompt, grown)
    assert grown.nbytes() <= allocated_bytes(grown) <= 2 * grown.nbytes()
