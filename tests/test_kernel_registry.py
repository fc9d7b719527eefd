"""Kernels describe themselves: the registry, learnable parameters, state sizes and the matrix's state bytes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from attnprobe.analyses.experiments.architectures import cache_bytes_per_token, catalogue
from attnprobe.kernels.registry import FAMILIES, KERNELS, make_kernel, names


def smollm2_like(layer_types=None):
    """SmolLM2-135M's attention shape: 30 layers x 9 heads, 3 KV heads, d = 64."""
    layer_types = layer_types or ["full"] * 30
    info = SimpleNamespace(n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, layer_types=layer_types,
                           window=lambda layer: None)
    return SimpleNamespace(info=info)


@pytest.mark.parametrize("name", KERNELS)
def test_parameters_are_exactly_the_learnable_ones(name):
    kernel = make_kernel(name, 3, 8)
    params = list(kernel.parameters())
    assert kernel.learnable == bool(params)
    assert all(p.requires_grad and p.shape[0] == 3 for p in params)  # per head, (H, ...)


def test_learnable_kernels_are_the_fitted_ones():
    assert sorted(n for n in KERNELS if make_kernel(n, 2, 8).learnable) == [
        "decay", "deltanet", "gated-deltanet", "gla", "hedgehog", "kda", "sink+window+gdn", "sink+window+linear", "window+linear"]
    assert make_kernel("taylor", 2, 8, feature_dim=3).learnable  # its projection is fitted


@pytest.mark.parametrize("name,megabytes", [("taylor", 75.29), ("elu", 2.25), ("relu", 2.25), ("performer", 2.25),
                                            ("hedgehog", 4.49), ("sink+window", 1.57), ("sink+window+linear", 6.06),
                                            ("gla", 2.25), ("decay", 2.25), ("deltanet", 2.21), ("gated-deltanet", 2.21), ("kda", 2.21),
                                            ("sink+window+gdn", 3.78)])
def test_fixed_state_bytes_are_each_kernels_own(name, megabytes):
    per_token, fixed = cache_bytes_per_token(smollm2_like(), set(), name)
    assert per_token == 0
    assert fixed / 1e6 == pytest.approx(megabytes, abs=0.01)


@pytest.mark.parametrize("name", ["softmax", "oracle-topk", "quest", "power"])
def test_heads_that_keep_every_token_keep_one_copy_per_kv_head(name):
    """Under GQA (9 query heads on 3 KV heads) a softmax or sparse replacement stores what the model's cache
    does, not one copy per query head."""
    model = smollm2_like()
    assert cache_bytes_per_token(model, set(), name) == cache_bytes_per_token(model, set(), None) == (30 * 3 * 2 * 64 * 2, 0)


def test_taylor_state_counts_its_2145_features():
    kernel = make_kernel("taylor", 1, 64)
    assert kernel.feature_map.dim == 2145 and kernel.state_numbers(64) == 2145 * 65
    assert make_kernel("softmax", 1, 64).cached_tokens is None and make_kernel("elu", 1, 64).cached_tokens == 0
    assert make_kernel("sink+window", 1, 64, window=16, sinks=2).cached_tokens == 18


def test_kept_heads_cache_every_token_for_their_kv_head():
    model = smollm2_like()
    per_token, fixed = cache_bytes_per_token(model, {(0, 0)}, "elu")
    assert per_token == 2 * 64 * 2  # one KV head of one layer
    assert fixed == (270 - 1) * 64 * 65 * 2
    assert cache_bytes_per_token(model, set(), None) == (30 * 3 * 2 * 64 * 2, 0)


def test_catalogue_rows_come_from_the_registry():
    rows = catalogue(smollm2_like())
    assert {f"all-{n}" for n in names("linear")} <= set(rows)
    assert set(names("hybrid")) <= set(rows)
    assert all(rows[name].kernel in FAMILIES for name in rows if name != "original")
    assert {"all-gla", "all-decay", "all-deltanet", "all-gated-deltanet", "layers-1of4-softmax-gdn", "sink+window+gdn"} <= set(rows)


@pytest.mark.parametrize("name", ["gla", "decay", "deltanet", "gated-deltanet", "kda"])
def test_training_takes_fla_where_its_backward_agrees(name, monkeypatch):
    """train_forward (stage 1 and stage 2 of a conversion) runs fla's chunked op (O(T) memory) wherever prefill
    runs it and `fla.trains` accepts its backward on that device; else our torch form: the quadratic one up to
    1,024 tokens (scalar decay's is one T x T decay matrix), the chunked one for GLA (its per-channel quadratic
    form is memory-bound). fla's plain delta rule refuses fp32, so fp32 DeltaNet stays on our form. fla is faked here:
    the CPU has no Triton."""
    import torch

    from attnprobe.kernels import dispatch, fla
    from attnprobe.kernels.deltanet import kernel as deltanet_module
    from attnprobe.kernels.gla import kernel as gla_module

    kernel = make_kernel(name, 2, 8)
    q = k = v = torch.randn(1, 2, 16, 8)
    calls = []
    monkeypatch.setattr(kernel, "quadratic", lambda *a: calls.append("quadratic") or q)
    torch_form = ["quadratic"] if kernel.quadratic_trains else []
    assert not kernel.fla_prefills(q) and kernel.quadratic_trains == (name != "gla")
    kernel.train_forward(q, k, v, 0.3)
    for module in (deltanet_module, gla_module):
        monkeypatch.setattr(module, "use_fla", lambda x: not dispatch._force_torch)

    def fake(*args):  # fla.prefill(op, q, k, values, ...) or fla.delta_prefill(q, k, v, ...): give the values back
        calls.append("fla")
        return (args[3] if isinstance(args[0], str) else args[2]), None

    monkeypatch.setattr(fla, "prefill", fake)
    monkeypatch.setattr(fla, "delta_prefill", fake)
    monkeypatch.setattr(fla, "trains", lambda kernel, x: True)
    kernel.train_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3)
    kernel.train_forward(q, k, v, 0.3)
    plain_delta = name == "deltanet"
    assert calls == torch_form + ["fla"] + (torch_form if plain_delta else ["fla"])
    assert kernel.fla_prefills(q) is not plain_delta and kernel.fla_prefills(q.bfloat16())
    calls.clear()
    monkeypatch.setattr(fla, "trains", lambda kernel, x: False)  # a refused or disagreeing backward: our form
    kernel.train_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3)
    assert calls == torch_form


def test_fla_backward_check_measures_and_caches(monkeypatch):
    """The gradient comparison itself: with both sides on our torch form (the CPU) the error is 0 in fp32 and
    bf16-sized in bf16; `trains` runs it once per op, device and dtype and holds it to BACKWARD_TOLERANCE."""
    import torch

    from attnprobe.kernels import fla

    kernel = make_kernel("gated-deltanet", 2, 16)
    assert fla.backward_error(kernel, torch.device("cpu"), torch.float32, length=64) < 1e-5
    assert fla.backward_error(kernel, torch.device("cpu"), torch.bfloat16, length=64) < 0.05
    seen = []
    monkeypatch.setattr(fla, "backward_errors", {})
    monkeypatch.setattr(fla, "backward_error", lambda kernel, device, dtype: seen.append(dtype) or 0.5)
    x = torch.zeros(1)
    assert not fla.trains(kernel, x) and not fla.trains(kernel, x) and seen == [torch.float32]
    assert fla.backward_errors[("gated-deltanet", None, "head", "cpu", torch.float32)] == 0.5


def test_the_fla_check_inside_an_activation_checkpoint(monkeypatch):
    """Stage 1 runs each layer under torch.utils.checkpoint: the first forward runs the backward check, the
    recomputation finds it cached, and the two must still save the same tensors (the GPU run of 2026-12-02
    failed there). fla is faked by a path that disagrees with ours, so training takes our form."""
    import torch

    from attnprobe.kernels import dispatch, fla
    from attnprobe.kernels.gla import kernel as gla_module

    kernel = make_kernel("decay", 2, 8)
    monkeypatch.setattr(gla_module, "use_fla", lambda x: not dispatch._force_torch)
    monkeypatch.setattr(fla, "prefill", lambda op, phi_q, phi_k, values, log_alpha, dtype: (2 * values, None))
    monkeypatch.setattr(fla, "backward_errors", {})
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    loss = torch.utils.checkpoint.checkpoint(lambda q, k, v: kernel.train_forward(q, k, v, 0.3).square().sum(), q, k, v,
                                             use_reentrant=False)
    loss.backward()
    with dispatch.torch_forms():
        expected = torch.autograd.grad(kernel.train_forward(q, k, v, 0.3).square().sum(), q)[0]
    assert list(fla.backward_errors.values()) == [float("inf")] and torch.allclose(q.grad, expected)
