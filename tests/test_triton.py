"""Triton kernels against torch references, on CPU through Triton's interpreter (CI has no GPU;
tests/interpreted.py says how)."""
from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's import: its library functions interpret too

import pytest
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.reducers import PatternStats
from attnprobe.kernels import attention_stats as reference
from interpreted import interpreted

pytest.importorskip("triton", reason="triton is not installed on this platform")


@pytest.fixture(scope="module")
def kernels():
    from attnprobe.kernels import triton_linear, triton_stats

    with interpreted(triton_stats, triton_linear) as (stats, linear):
        yield stats, linear


def eager_pattern(q, k, scaling, window=None):
    positions = torch.arange(k.shape[2] - q.shape[2], k.shape[2])
    allowed = reference.allowed_keys(positions, k.shape[2], window)
    scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1), torch.logsumexp(scores, dim=-1), positions


def diagonal_from_pattern(pattern, positions, off, start=0):
    rows = [i for i, p in enumerate(positions.tolist()) if p >= max(off, start)]
    return torch.stack([pattern[:, :, i, positions[i] - off] for i in rows], dim=-1).mean(-1)


def random_qk(batch, heads, n_queries, n_keys, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_queries, dim, generator=gen) * 1.5
    k = torch.randn(batch, heads, n_keys, dim, generator=gen) * 1.5
    return q, k


def assert_stats_match_pattern(stats, pattern, lse, positions, offsets, rows, start=0):
    torch.testing.assert_close(stats.lse, lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.column_sum, pattern.sum(dim=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.first_token, pattern[..., 0], atol=1e-6, rtol=1e-5)
    for off in offsets:
        torch.testing.assert_close(stats.diagonal[off], diagonal_from_pattern(pattern, positions, off, start),
                                   atol=1e-6, rtol=1e-5)
    index = [positions.tolist().index(r) for r in rows]
    assert torch.equal(stats.argmax, pattern[:, :, index].argmax(dim=-1))


# (queries, keys, head dim, window): a prefill, a partial last block, padding of d, queries after a prefix, a sliding window
STATS_CASES = [(128, 128, 32, None), (100, 100, 16, None), (70, 90, 24, None), (96, 96, 16, 17), (64, 128, 32, 40)]


@pytest.mark.parametrize("n_queries,n_keys,dim,window", STATS_CASES)
def test_triton_stats_equal_eager_pattern(kernels, n_queries, n_keys, dim, window):
    stats_mod, _ = kernels
    q, k = random_qk(1, 2, n_queries, n_keys, dim)
    pattern, lse, positions = eager_pattern(q, k, dim ** -0.5, window)
    rows = [n_keys - 1, n_keys - n_queries + 5]
    stats = stats_mod.attention_stats(q, k, dim ** -0.5, window, diagonals=(1, 4), argmax_rows=rows, diagonal_start=8)
    assert_stats_match_pattern(stats, pattern, lse, positions, (1, 4), rows, start=8)


@pytest.mark.parametrize("n_queries,n_keys,dim,window", STATS_CASES[::2])
def test_reference_stats_equal_eager_pattern(monkeypatch, n_queries, n_keys, dim, window):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 6 * n_keys * 7)  # several query chunks of 7 rows
    q, k = random_qk(2, 3, n_queries, n_keys, dim, seed=1)
    pattern, lse, positions = eager_pattern(q, k, dim ** -0.5, window)
    rows = [n_keys - 1]
    stats = reference.reference_stats(q, k, dim ** -0.5, window, diagonals=(2,), argmax_rows=rows)
    assert_stats_match_pattern(stats, pattern, lse, positions, (2,), rows)


def test_given_lse_skips_the_lse_pass_and_agrees(kernels):
    stats_mod, _ = kernels
    q, k = random_qk(1, 2, 64, 64, 16, seed=2)
    pattern, lse, _ = eager_pattern(q, k, 0.3)
    stats = stats_mod.attention_stats(q, k, 0.3, lse=lse)
    assert stats.lse is not None and torch.equal(stats.lse, lse)
    torch.testing.assert_close(stats.column_sum, pattern.sum(dim=2), atol=1e-5, rtol=1e-5)


def test_column_sums_agree_with_the_pattern_reducer(kernels):
    """The reducer the chunked backend feeds and the kernel must give the same alpha and diagonals."""
    stats_mod, _ = kernels
    q, k = random_qk(1, 3, 80, 80, 32, seed=3)
    pattern, _, _ = eager_pattern(q, k, 32 ** -0.5)
    reducer = PatternStats(diagonals=(1,))
    reducer.update(pattern[:, :, :50], torch.arange(50))
    reducer.update(pattern[:, :, 50:], torch.arange(50, 80))
    stats = stats_mod.attention_stats(q, k, 32 ** -0.5, diagonals=(1,))
    torch.testing.assert_close(stats.column_sum, reducer.column_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.diagonal[1], reducer.diagonal(1), atol=1e-6, rtol=1e-5)


def test_dispatch_and_errors(kernels):
    stats_mod, _ = kernels
    q, k = random_qk(1, 2, 32, 32, 16, seed=4)
    forced_torch = stats_mod.attention_stats(q, k, 0.25, use_triton=False)
    kernel = stats_mod.attention_stats(q, k, 0.25, use_triton=True)
    torch.testing.assert_close(forced_torch.column_sum, kernel.column_sum, atol=1e-5, rtol=1e-5)
    with pytest.raises(AttnprobeError, match="repeat k for GQA"):
        stats_mod.attention_stats(q, k[:, :1], 0.25)
    with pytest.raises(AttnprobeError, match="argmax rows"):
        stats_mod.attention_stats(q, k, 0.25, argmax_rows=[32])


def test_triton_refused_on_cpu_without_interpreter(kernels, monkeypatch):
    stats_mod, linear = kernels
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k = random_qk(1, 1, 16, 16, 16)
    assert stats_mod.attention_stats(q, k, 0.25).column_sum.shape == (1, 1, 16)  # falls back to torch
    with pytest.raises(AttnprobeError, match="CUDA tensors"):
        stats_mod.attention_stats(q, k, 0.25, use_triton=True)
    with pytest.raises(AttnprobeError, match="CUDA tensors"):
        linear.chunked_linear_attention(q.abs(), k.abs(), q)


def features(batch, heads, n, width, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, heads, n, width, generator=gen), torch.rand(batch, heads, n, width, generator=gen)


@pytest.mark.parametrize("n,width,dv", [(128, 32, 32), (100, 16, 24), (64, 20, 16)])
def test_chunked_linear_equals_quadratic(kernels, n, width, dv):
    _, linear = kernels
    phi_q, phi_k = features(1, 2, n, width, seed=n)
    v = torch.randn(1, 2, n, dv, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(linear.chunked_linear_attention(phi_q, phi_k, v),
                               linear.linear_attention_reference(phi_q, phi_k, v), atol=1e-5, rtol=1e-4)
    raw = linear.linear_attention_reference(phi_q, phi_k, v, normalize=False)
    torch.testing.assert_close(linear.chunked_linear_attention(phi_q, phi_k, v, normalize=False), raw,
                               atol=1e-4 * raw.abs().max().item(), rtol=1e-4)


def test_decode_steps_continue_the_quadratic_form(kernels):
    _, linear = kernels
    phi_q, phi_k = features(1, 2, 6, 20, seed=5)
    v = torch.randn(1, 2, 6, 24)
    state, norm = torch.zeros(1, 2, 20, 24), torch.zeros(1, 2, 20)
    ref_state, ref_norm = state.clone(), norm.clone()
    outputs = []
    for t in range(6):
        outputs.append(linear.linear_decode_step(phi_q[:, :, t], phi_k[:, :, t], v[:, :, t], state, norm))
        _, ref_state, ref_norm = linear.decode_step_reference(phi_q[:, :, t], phi_k[:, :, t], v[:, :, t], ref_state, ref_norm)
    torch.testing.assert_close(torch.stack(outputs, dim=2), linear.linear_attention_reference(phi_q, phi_k, v),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state, ref_state)
    torch.testing.assert_close(norm, ref_norm)


@pytest.mark.parametrize("window,segment", [(17, 64), (None, 64), (40, 128)])
def test_hybrid_kernel_equals_per_head_references(kernels, window, segment):
    _, linear = kernels
    q, k = random_qk(2, 4, 128, 128, 32, seed=6)
    v = torch.randn(2, 4, 128, 24, generator=torch.Generator().manual_seed(8))
    modes = [0, 1, 1, 0]
    phi_q, phi_k = features(2, 2, 128, 20, seed=9)
    out = linear.hybrid_attention(q, k, v, phi_q, phi_k, modes, 32 ** -0.5, window, segment=segment)
    expected = linear.hybrid_reference(q, k, v, phi_q, phi_k, modes, 32 ** -0.5, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    softmax_head = linear.window_softmax_reference(q[:, :1], k[:, :1], v[:, :1], 32 ** -0.5, window)
    torch.testing.assert_close(out[:, :1], softmax_head, atol=1e-5, rtol=1e-4)


def test_hybrid_rejects_bad_modes(kernels):
    _, linear = kernels
    q, k = random_qk(1, 2, 64, 64, 16)
    phi_q, phi_k = features(1, 1, 64, 16, seed=1)
    with pytest.raises(AttnprobeError, match="modes"):
        linear.hybrid_attention(q, k, q, phi_q, phi_k, [0, 2], 0.25, 8)
    with pytest.raises(AttnprobeError, match="linear heads"):
        linear.hybrid_attention(q, k, q, phi_q, phi_k, [1, 1], 0.25, 8)


def test_hybrid_kernel_on_a_length_that_is_no_multiple_of_the_block(kernels):
    _, linear = kernels
    q, k = random_qk(1, 3, 100, 100, 16, seed=10)
    v = torch.randn(1, 3, 100, 16, generator=torch.Generator().manual_seed(11))
    phi_q, phi_k = features(1, 2, 100, 16, seed=12)
    modes = [1, 0, 1]
    out = linear.hybrid_attention(q, k, v, phi_q, phi_k, modes, 0.25, 30, segment=64)
    torch.testing.assert_close(out, linear.hybrid_reference(q, k, v, phi_q, phi_k, modes, 0.25, 30), atol=1e-5, rtol=1e-4)


def test_entries_kernel_reads_first_token_and_diagonals(kernels):
    stats_mod, _ = kernels
    q, k = random_qk(1, 2, 50, 70, 16, seed=13)
    pattern, lse, positions = eager_pattern(q, k, 0.25, window=9)
    entries = stats_mod.triton_entries(q, k, lse, 0.25, [(0, 0), (-1, 1), (-12, 1)], window=9)
    index = torch.arange(50)
    torch.testing.assert_close(entries[:, :, 0], pattern[..., 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(entries[:, :, 1], pattern[:, :, index, positions - 1], atol=1e-6, rtol=1e-5)
    assert torch.equal(entries[:, :, 2], torch.zeros_like(entries[:, :, 2]))  # offset 12 lies outside the window


def native_pattern_reads(model_fn, ids, monkeypatch):
    """PatternStats of every layer through the native backend: chunked torch path, then the Triton path."""
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.sites import Site
    from attnprobe.kernels import dispatch
    from tiny_hf import TinyTokenizer, wrap

    backend = make_backend("native", wrap(model_fn(), TinyTokenizer()))
    results = []
    for on_triton in (False, True):
        reads = {(layer, Site.PATTERN): PatternStats(diagonals=(1, 3), diagonal_start=4, track_argmax=True)
                 for layer in range(backend.info.n_layers)}
        if on_triton:
            with dispatch.triton_on_cpu():
                logits = backend.run(ids, reads)
        else:
            logits = backend.run(ids, reads)
        results.append((logits, reads))
        triton_calls = sum(n for (_, path), n in backend.paths.items() if path == "fused-statistics")
        assert triton_calls == (backend.info.n_layers if on_triton else 0)
    return results


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_native_backend_statistics_through_triton_equal_the_chunked_path(kernels, model_name, monkeypatch):
    """On CUDA the native backend reads PatternStats through the Triton kernels; here, through the interpreter."""
    import tiny_hf as tb

    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(14))
    (torch_logits, torch_reads), (triton_logits, triton_reads) = native_pattern_reads(getattr(tb, model_name), ids, monkeypatch)
    torch.testing.assert_close(triton_logits, torch_logits, atol=1e-5, rtol=1e-5)
    for key, want in torch_reads.items():
        got = triton_reads[key]
        torch.testing.assert_close(got.alpha(), want.alpha(), atol=1e-5, rtol=1e-5)
        for off in (1, 3):
            torch.testing.assert_close(got.diagonal(off), want.diagonal(off), atol=1e-6, rtol=1e-5)
        assert [a.tolist() for a in got.argmax_steps] == [a.tolist() for a in want.argmax_steps]


@pytest.mark.parametrize("name", ["elu", "hedgehog"])  # hedgehog's softmax features give sums far below 1e-6
def test_linear_kernel_prefill_through_triton_equals_torch(kernels, name):
    from attnprobe.kernels import dispatch
    from attnprobe.kernels.registry import make_kernel

    kernel = make_kernel(name, 2, 16)
    q, k = random_qk(1, 2, 100, 100, 16, seed=15)
    q, k = q * 4, k * 4  # sharp features
    v = torch.randn(1, 2, 100, 16, generator=torch.Generator().manual_seed(16))
    want, want_state = kernel.prefill(q, k, v, 0.25)
    with dispatch.triton_on_cpu():
        got, got_state = kernel.prefill(q, k, v, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_state.s, want_state.s, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got_state.n, want_state.n, atol=1e-4, rtol=1e-5)
    step_q, step_k, step_v = (x[:, :, -1:] for x in (q, k, v))  # decoding goes on from the Triton state alike
    torch.testing.assert_close(kernel.step(got_state, step_q, step_k, step_v, 0.25)[0],
                               kernel.step(want_state, step_q, step_k, step_v, 0.25)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["elu", "hedgehog"])
def test_swapped_layers_prefill_in_one_hybrid_launch_and_decode_on(kernels, name, monkeypatch):
    """On CUDA a layer with heads replaced by linear kernels runs fused; decoding continues from its state."""
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.swap import kernel_edit
    from attnprobe.kernels import dispatch
    from attnprobe.kernels.registry import make_kernel
    from tiny_hf import TinyTokenizer, tiny_llama, wrap

    hf = tiny_llama()
    hf.generation_config.eos_token_id = None
    backend = make_backend("native", wrap(hf, TinyTokenizer()))
    layers, heads = [0, 2], [0, 3]
    torch.manual_seed(3)
    replacements = {layer: make_kernel(name, len(heads), 16) for layer in layers}
    prompt = torch.randint(3, 100, (1, 13), generator=torch.Generator().manual_seed(17))
    stateful = [kernel_edit(layer, heads, replacements[layer]) for layer in layers]
    with dispatch.triton_on_cpu(), backend.patched(stateful):
        out = hf.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    fused_layers = sorted(layer for (layer, path), n in backend.paths.items() if path == "fused-hybrid" for _ in range(n))
    assert fused_layers == layers  # the prefill of both swapped layers ran in the hybrid kernel
    reference = backend.run(out.sequences, edits=[kernel_edit(layer, heads, replacements[layer], recompute=True) for layer in layers])
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference[:, prompt.shape[1] - 1:-1], atol=1e-4, rtol=1e-4)


def test_linear_heads_decode_through_the_triton_step_on_the_compact_cache(kernels, tiny_llama_model, monkeypatch):
    """On CUDA the recurrent steps run in `triton_linear.linear_decode_step`; here through the interpreter."""
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.cache import architecture_cache
    from attnprobe.kernels import dispatch
    from test_cache import NEW_TOKENS, edits_for, greedy
    from transformers import DynamicCache

    stats, linear = kernels
    steps = []
    original = linear.linear_decode_step
    monkeypatch.setattr(linear, "linear_decode_step", lambda *a, **k: steps.append(1) or original(*a, **k))
    model = tiny_llama_model
    backend = make_backend("native", model)
    prompt = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(11))
    edits = edits_for(model, "mixed")
    want_ids, want_logits = greedy(model, backend, edits, prompt, DynamicCache(config=model.hf.config))
    assert not steps  # the torch path off CUDA
    with dispatch.triton_on_cpu():
        got_ids, got_logits = greedy(model, backend, edits, prompt, architecture_cache(model, edits))
    linear_edits = [e for e in edits if e.kernel.name in ("hedgehog", "elu")]
    assert len(linear_edits) == 2 and len(steps) == (NEW_TOKENS - 1) * len(linear_edits)  # one step per token and edit
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
