"""Replacement kernels: the quadratic, chunked and recurrent forms agree, are causal and stay finite."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.linear.feature_maps import PerformerMap, TaylorMap
from attnprobe.kernels.registry import KERNELS, make_kernel, select_heads

# small windows and chunks, so that short sequences cross every chunk and window boundary
CONFIGS = [
    ("softmax", {"chunk": 8}),
    ("elu", {"chunk": 8}),
    ("relu", {"chunk": 8}),
    ("taylor", {"chunk": 8}),
    ("taylor", {"feature_dim": 3, "chunk": 8}),
    ("performer", {"n_features": 12, "chunk": 8}),
    ("hedgehog", {"chunk": 8}),
    ("window+linear", {"window": 5, "chunk": 8}),
    ("sink+window", {"window": 5, "sinks": 2, "chunk": 8}),
    ("sink+window+linear", {"window": 5, "sinks": 3, "chunk": 8}),
    ("sink+window+linear", {"window": 6, "sinks": 2, "chunk": 4, "feature_map": "taylor"}),
    ("gla", {"chunk": 8}),
    ("decay", {"data_dependent": True, "chunk": 8}),
    ("deltanet", {"chunk": 8}),
    ("gated-deltanet", {"chunk": 8}),
    ("kda", {"chunk": 8}),
    ("sink+window+gdn", {"window": 5, "sinks": 2, "chunk": 8}),
]
IDS = [f"{name}{options or ''}" for name, options in CONFIGS]
EXAMPLES = settings(max_examples=5, deadline=None)


def build(name, options, heads, head_dim, seed=0):
    """A kernel whose learnable parameters are moved off their init, so fitted kernels are covered too."""
    kernel = make_kernel(name, heads, head_dim, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in kernel.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return kernel


def qkv(batch, heads, length, head_dim, seed, scale=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(batch, heads, length, head_dim, generator=generator)).to(dtype) for _ in range(3)]


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 40), st.sampled_from([4, 8]),
                   st.integers(0, 10_000), st.floats(0.0, 1.0))


def three_forms(kernel, q, k, v, scaling, split):
    """(quadratic, chunked prefill, prefill of the first `split` tokens then token-by-token decode)."""
    with torch.no_grad():
        quadratic = kernel.quadratic(q, k, v, scaling)
        chunked, _ = kernel.prefill(q, k, v, scaling)
        head, state = kernel.prefill(q[:, :, :split], k[:, :, :split], v[:, :, :split], scaling)
        tail, _ = kernel.decode(state, q[:, :, split:], k[:, :, split:], v[:, :, split:], scaling)
    return quadratic, chunked, torch.cat([head, tail], dim=2)


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
@EXAMPLES
@given(shape=shapes)
def test_forms_agree_fp32(name, options, shape):
    batch, heads, length, head_dim, seed, where = shape
    kernel = build(name, options, heads, head_dim, seed)
    q, k, v = qkv(batch, heads, length, head_dim, seed)
    split = max(1, int(where * length))
    quadratic, chunked, recurrent = three_forms(kernel, q, k, v, head_dim ** -0.5, split)
    assert quadratic.dtype == torch.float32 and quadratic.shape == q.shape
    torch.testing.assert_close(chunked, quadratic, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(recurrent, quadratic, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", KERNELS)
def test_forms_agree_with_default_options_across_chunks(name):
    kernel = build(name, {}, 2, 8)
    q, k, v = qkv(1, 2, 150, 8, seed=7)
    quadratic, chunked, recurrent = three_forms(kernel, q, k, v, 8 ** -0.5, split=70)
    torch.testing.assert_close(chunked, quadratic, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(recurrent, quadratic, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
@settings(max_examples=2, deadline=None)
@given(shape=shapes)
def test_forms_agree_bf16(name, options, shape):
    batch, heads, length, head_dim, seed, where = shape
    kernel = build(name, options, heads, head_dim, seed)
    q, k, v = qkv(batch, heads, length, head_dim, seed, dtype=torch.bfloat16)
    quadratic, chunked, recurrent = three_forms(kernel, q, k, v, head_dim ** -0.5, max(1, int(where * length)))
    assert chunked.dtype == recurrent.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, quadratic, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(recurrent, quadratic, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
@EXAMPLES
@given(shape=shapes)
def test_future_tokens_never_change_the_past(name, options, shape):
    batch, heads, length, head_dim, seed, where = shape
    if length < 2:
        return
    cut = max(1, min(length - 1, int(where * length)))
    kernel = build(name, options, heads, head_dim, seed)
    q, k, v = qkv(batch, heads, length, head_dim, seed)
    q2, k2, v2 = (torch.cat([x[:, :, :cut], 5 * y[:, :, cut:]], dim=2) for x, y in zip((q, k, v), qkv(batch, heads, length, head_dim, seed + 1)))
    with torch.no_grad():
        for form in (kernel.quadratic, kernel.forward):
            before, after = form(q, k, v, 0.4)[:, :, :cut], form(q2, k2, v2, 0.4)[:, :, :cut]
            torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kernel(q, k, v, 0.4)[:, :, cut:], kernel(q2, k2, v2, 0.4)[:, :, cut:])


@EXAMPLES
@given(shape=shapes)
def test_softmax_kernel_equals_sdpa(shape):
    batch, heads, length, head_dim, seed, where = shape
    q, k, v = qkv(batch, heads, length, head_dim, seed)
    scaling = 0.1 + where
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    kernel = make_kernel("softmax", heads, head_dim, chunk=7)
    for form in (kernel.quadratic, kernel.forward):
        torch.testing.assert_close(form(q, k, v, scaling), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,options", [("sink+window", {"window": 50}), ("window+linear", {"window": 50}),
                                          ("sink+window+linear", {"window": 50})])
def test_hybrids_with_a_window_over_everything_are_softmax(name, options):
    q, k, v = qkv(2, 3, 40, 8, seed=1)
    expected = make_kernel("softmax", 3, 8).quadratic(q, k, v, 0.3)
    with torch.no_grad():
        torch.testing.assert_close(build(name, options, 3, 8)(q, k, v, 0.3), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,options", CONFIGS, ids=IDS)
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e4])
def test_no_nan_or_inf_on_extreme_inputs(name, options, scale):
    kernel = build(name, options, 2, 8)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = qkv(1, 2, 20, 8, seed=3, scale=scale, dtype=dtype)
        for z in three_forms(kernel, q, k, v, 8 ** -0.5, split=7):
            assert torch.isfinite(z).all(), f"{name} at scale {scale} in {dtype}"


def test_relu_zero_denominator_gives_zero_output():
    q = torch.tensor([[[[-1.0, -1.0], [1.0, 1.0]]]])  # first query shares no positive channel with any key
    k = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    v = torch.ones_like(k)
    z = make_kernel("relu", 1, 2)(q, k, v, 1.0)
    assert z[0, 0, 0].abs().max() == 0 and torch.allclose(z[0, 0, 1], torch.ones(2))


def test_taylor_features_give_second_order_exp():
    q, k, _ = qkv(1, 2, 5, 6, seed=2)
    feature_map = TaylorMap(2, 6)
    s = 0.3 * (q @ k.transpose(-1, -2))
    phi_q, phi_k = feature_map(q, 0.3)[0], feature_map(k, 0.3)[0]
    assert phi_q.shape[-1] == 1 + 6 + 21
    torch.testing.assert_close(phi_q @ phi_k.transpose(-1, -2), 1 + s + s * s / 2, atol=1e-5, rtol=1e-5)


def test_performer_features_estimate_exp():
    q, k, _ = qkv(1, 1, 6, 4, seed=4, scale=0.5)
    feature_map = PerformerMap(1, 4, n_features=8192, seed=1)
    (phi_q, log_q), (phi_k, log_k) = feature_map(q, 0.5), feature_map(k, 0.5)
    estimate = (phi_q @ phi_k.transpose(-1, -2)) * torch.exp(log_q[..., :, None] + log_k[..., None, :])
    exact = torch.exp(0.5 * q @ k.transpose(-1, -2))
    assert ((estimate - exact).abs() / exact).max() < 0.1


def test_select_heads_keeps_each_heads_parameters():
    kernel = build("window+linear", {"window": 4}, 3, 8)
    q, k, v = qkv(1, 3, 12, 8, seed=5)
    subset = select_heads(kernel, [2, 0])
    with torch.no_grad():
        torch.testing.assert_close(subset(q[:, [2, 0]], k[:, [2, 0]], v[:, [2, 0]], 0.3), kernel(q, k, v, 0.3)[:, [2, 0]])


def test_unknown_kernel_lists_the_valid_names():
    with pytest.raises(AttnprobeError) as error:
        make_kernel("cosformer", 2, 8)
    assert all(name in str(error.value) for name in KERNELS)


@pytest.mark.parametrize("name,options,match", [
    ("elu", {"window": 3}, "valid options"),
    ("performer", {"n_features": 4}, "n_features >= head_dim"),
    ("window+linear", {"feature_map": "performer"}, "cannot use performer"),
    ("sink+window", {"window": 0}, "window >= 1"),
    ("window+linear", {"feature_map": "cosine"}, "unknown feature map"),
])
def test_bad_options_raise(name, options, match):
    with pytest.raises(AttnprobeError, match=match):
        make_kernel(name, 2, 8, **options)


def test_window_weight_starts_at_a_tenth():
    kernel = make_kernel("window+linear", 4, 8)
    torch.testing.assert_close(torch.sigmoid(kernel.window_logit), torch.full((4,), 0.1))
    assert math.isclose(kernel.window_logit[0].item(), math.log(0.1 / 0.9), rel_tol=1e-6)


def test_hedgehog_maps_queries_and_keys_apart_and_loads_the_shared_form():
    """LoLCATs trains one Hedgehog map for queries and one for keys; a fit saved with the earlier shared map
    (`feature_map.weight`) loads as both, which is the same kernel."""
    from attnprobe.kernels.registry import make_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 4) for _ in range(3))
    kernel = make_kernel("hedgehog", 2, 4)
    with torch.no_grad():
        kernel.feature_map.key_weight.add_(0.5 * torch.randn(2, 4, 4))
    assert kernel.feature_map.query(q, 0.5)[0].allclose(make_kernel("hedgehog", 2, 4).feature_map.query(q, 0.5)[0])
    assert not kernel.feature_map.key(q, 0.5)[0].allclose(kernel.feature_map.query(q, 0.5)[0])
    shared = torch.eye(4).repeat(2, 1, 1) + 0.3 * torch.randn(2, 4, 4)
    old = make_kernel("hedgehog", 2, 4)
    old.load_state_dict({"feature_map.weight": shared})
    assert torch.equal(old.feature_map.query_weight, shared) and torch.equal(old.feature_map.key_weight, shared)

    def phi(x):  # the old map, on queries and keys alike
        y = torch.einsum("bhtd,hde->bhte", x, shared)
        return torch.softmax(torch.cat([y, -y], dim=-1), dim=-1)

    scores = (phi(q) @ phi(k).transpose(-1, -2)).tril()
    torch.testing.assert_close(old.quadratic(q, k, v, 0.5), (scores / scores.sum(-1, keepdim=True)) @ v)
