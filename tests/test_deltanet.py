"""DeltaNet and Gated DeltaNet: every form equals the delta-rule recurrence under GQA, the effective
attention is exact, and both equal flash-linear-attention's and transformers' torch references."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.deltanet import l2_normalize, naive
from attnprobe.kernels.registry import make_kernel
from fla_refs import fla_reference
from test_gla import forms, gqa_inputs, perturbed

CASES = [("deltanet", {}), ("gated-deltanet", {}), ("gated-deltanet", {"half_life": [1.0, 4.0, 16.0, 64.0]}),
         ("kda", {"half_life": [1.0, 4.0, 16.0, 64.0]})]


def coefficients(kernel, q, k):
    beta, log_alpha = kernel.coefficients(k)
    return l2_normalize(q), l2_normalize(k), beta, log_alpha


@pytest.mark.parametrize("name,options", CASES, ids=str)
def test_every_form_is_the_delta_rule_under_gqa(name, options):
    kernel = perturbed(name, 4, 8, chunk=8, **options)
    q, k, v = gqa_inputs(8, length=31)
    with torch.no_grad():
        qn, kn, beta, log_alpha = coefficients(kernel, q, k)
        expected = naive.delta_recurrent(qn, kn, v, beta, log_alpha)
        exact = naive.delta_weights(qn, kn, beta, log_alpha, torch.arange(31))  # by an explicit inverse
        torch.testing.assert_close(exact @ v, expected, atol=1e-5, rtol=1e-4)
    for form, z in forms(kernel, q, k, v, 0.3, split=13).items():
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4, msg=form)
    rows = torch.tensor([0, 9, 30])
    torch.testing.assert_close(kernel.attention_weights(q[:, :, rows], k, 0.3, rows), exact[:, :, rows], atol=1e-5, rtol=1e-4)


def test_the_delta_rule_overwrites_where_linear_attention_adds():
    """With beta = 1 a second value written under the same key replaces the first: q = k reads it back."""
    kernel = make_kernel("deltanet", 1, 4, beta=0.5)
    with torch.no_grad():
        kernel.beta_bias.fill_(30.0)  # beta = 1
    k = torch.tensor([[[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0]]]])
    v = torch.tensor([[[[1.0, 2, 3, 4], [5.0, 6, 7, 8], [9.0, 9, 9, 9]]]])
    z = kernel(k, k, v, 1.0)
    torch.testing.assert_close(z[0, 0, 2], v[0, 0, 2])  # not v0 + v2
    torch.testing.assert_close(kernel.attention_weights(k, k, 1.0, torch.arange(3))[0, 0, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_beta_and_gate_start_where_asked():
    kernel = make_kernel("gated-deltanet", 3, 8, beta=0.3, half_life=10.0)
    beta, log_alpha = kernel.coefficients(torch.randn(1, 3, 5, 8))
    torch.testing.assert_close(beta, torch.full_like(beta, 0.3))
    torch.testing.assert_close(torch.exp(10 * log_alpha[..., 0]), torch.full_like(beta, 0.5))
    assert make_kernel("deltanet", 3, 8).coefficients(torch.randn(1, 3, 5, 8))[0].allclose(torch.tensor(0.5))
    assert {n for n, _ in make_kernel("deltanet", 3, 8).named_parameters()} == {"beta_weight", "beta_bias"}


def test_chunked_form_is_differentiable_like_the_recurrence():
    q, k, v = gqa_inputs(9, length=19)
    grads = []
    for form in ("forward", "recurrent"):
        kernel = perturbed("gated-deltanet", 4, 8, chunk=8)
        if form == "forward":
            z = kernel(q, k, v, 0.3)
        else:
            qn, kn, beta, log_alpha = coefficients(kernel, q, k)
            z = naive.delta_recurrent(qn, kn, v, beta, log_alpha)
        z.square().sum().backward()
        grads.append({n: p.grad for n, p in kernel.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4)


def test_kda_starts_as_gated_deltanet_and_then_gates_each_channel():
    q, k, v = gqa_inputs(12)
    kda, gdn = (make_kernel(name, 4, 8, chunk=8, half_life=6.0, beta=0.4) for name in ("kda", "gated-deltanet"))
    with torch.no_grad():
        torch.testing.assert_close(kda(q, k, v, 0.3), gdn(q, k, v, 0.3))
        kda.gate_weight.normal_(generator=torch.Generator().manual_seed(0))
        log_alpha = kda.coefficients(k)[1]
    assert log_alpha.shape == (2, 4, 29, 8) and (log_alpha.std(-1) > 0).all()


def test_bad_options_raise():
    with pytest.raises(AttnprobeError, match="0 < beta < 1"):
        make_kernel("deltanet", 2, 8, beta=1.5)
    with pytest.raises(AttnprobeError, match="valid options"):
        make_kernel("deltanet", 2, 8, half_life=3.0)


@pytest.mark.parametrize("name", ["deltanet", "gated-deltanet", "kda"])
def test_equals_flash_linear_attention_reference(name):
    kernel = perturbed(name, 4, 8, chunk=8)
    q, k, v = gqa_inputs(10)
    with torch.no_grad():
        ours = kernel(q, k, v, 0.3)
        qn, kn, beta, log_alpha = coefficients(kernel, q, k)
        if name == "deltanet":  # (B, H, T, d), q scaled by d^-0.5 inside
            theirs, _ = fla_reference("ops/delta_rule/naive.py").delta_rule_recurrence(qn * 8 ** 0.5, kn, v, beta)
        elif name == "gated-deltanet":
            theirs, _ = fla_reference("ops/gated_delta_rule/naive.py").naive_recurrent_gated_delta_rule(
                *(x.transpose(1, 2) for x in (qn, kn, v, beta, log_alpha[..., 0])), scale=1.0)
            theirs = theirs.transpose(1, 2)
        else:
            theirs, _ = fla_reference("ops/kda/naive.py").naive_recurrent_kda(
                *(x.transpose(1, 2) for x in (qn, kn, v, log_alpha, beta)), scale=1.0)
            theirs = theirs.transpose(1, 2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_equals_transformers_torch_gated_deltanet():
    if importlib.util.find_spec("transformers.models.qwen3_next") is None:
        pytest.skip("this transformers has no Qwen3-Next (its torch Gated DeltaNet fallback)")
    from transformers.models.qwen3_next import modeling_qwen3_next

    chunked = modeling_qwen3_next.torch_chunk_gated_delta_rule
    chunked = getattr(chunked, "__wrapped__", chunked)  # the torch path, not a hub or fla kernel it may wrap
    kernel = perturbed("gated-deltanet", 4, 8, chunk=8)
    q, k, v = gqa_inputs(11, length=70)
    with torch.no_grad():
        ours = kernel(q, k, v, 0.3)
        qn, kn, beta, log_alpha = coefficients(kernel, q, k)
        theirs, _ = chunked(*(x.transpose(1, 2) for x in (qn * 8 ** 0.5, kn, v, log_alpha[..., 0], beta)), chunk_size=16)  # q scaled by d^-0.5 inside
    torch.testing.assert_close(ours, theirs.transpose(1, 2).float(), atol=1e-5, rtol=1e-4)
