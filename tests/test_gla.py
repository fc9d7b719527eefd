"""Gated linear attention: every form equals the paper's formula, under GQA; equal to fla's reference."""
from __future__ import annotations

import pytest
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.gla import naive
from attnprobe.kernels.registry import make_kernel
from fla_refs import fla_reference

OPTIONS = [{}, {"gate": "projection", "gate_rank": 3}, {"feature_map": "identity", "normalize": False}]


def perturbed(name, heads, dim, seed=0, **options):
    kernel = make_kernel(name, heads, dim, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in kernel.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return kernel


def gqa_inputs(seed, length=29, heads=4, kv_heads=2, dim=8):
    """q for `heads` query heads, k and v of `kv_heads` heads repeated to them (as the swap hands them over)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, generator=generator)
    k, v = (torch.randn(2, kv_heads, length, dim, generator=generator).repeat_interleave(heads // kv_heads, dim=1) for _ in range(2))
    return q, k, v


def forms(kernel, q, k, v, scaling, split):
    with torch.no_grad():
        head, state = kernel.prefill(q[:, :, :split], k[:, :, :split], v[:, :, :split], scaling)
        tail, _ = kernel.decode(state, q[:, :, split:], k[:, :, split:], v[:, :, split:], scaling)
        return {"quadratic": kernel.quadratic(q, k, v, scaling), "chunked": kernel(q, k, v, scaling),
                "recurrent": torch.cat([head, tail], dim=2),
                "weights @ v": kernel.attention_weights(q, k, scaling, torch.arange(q.shape[2])) @ v}


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_form_is_the_gla_formula_under_gqa(options, seed):
    kernel = perturbed("gla", 4, 8, seed, chunk=8, **options)
    q, k, v = gqa_inputs(seed)
    scaling = 8 ** -0.5
    with torch.no_grad():
        phi_q, phi_k = kernel.features(q, k, scaling)
        log_alpha = kernel.log_gates(k)
        expected = naive.gla_weights(phi_q, phi_k, log_alpha, torch.arange(29), kernel.normalize) @ v
        torch.testing.assert_close(naive.gla_recurrent(phi_q, phi_k, v, log_alpha, kernel.normalize), expected, atol=1e-5, rtol=1e-4)
    for form, z in forms(kernel, q, k, v, scaling, split=11).items():
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4, msg=form)


def test_effective_attention_of_some_rows_and_its_sums():
    kernel = perturbed("gla", 4, 8, chunk=8)
    q, k, _ = gqa_inputs(3, length=40)
    rows = torch.tensor([0, 7, 8, 23, 39])
    full = kernel.attention_weights(q, k, 0.3, torch.arange(40))
    torch.testing.assert_close(kernel.attention_weights(q[:, :, rows], k, 0.3, rows), full[:, :, rows])
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 4, 40))
    assert torch.all(full.triu(1) == 0) and torch.all(full >= 0)


def test_liger_gate_reads_the_pretrained_keys():
    """At init no projection is new: log alpha = logsigmoid(k) / 16, channel by channel."""
    kernel = make_kernel("gla", 2, 8)
    k = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(kernel.log_gates(k), torch.nn.functional.logsigmoid(k) / 16)
    assert {n for n, _ in kernel.named_parameters()} == {"gate_weight", "gate_bias"}
    projection = make_kernel("gla", 2, 8, gate="projection")
    torch.testing.assert_close(projection.log_gates(k), torch.full_like(k, torch.nn.functional.logsigmoid(torch.tensor(0.0)).item() / 16))


def test_quadratic_and_chunked_forms_give_the_same_gradients():
    q, k, v = gqa_inputs(4, length=20)
    grads = []
    for form in ("quadratic", "forward"):
        kernel = perturbed("gla", 4, 8, chunk=8, gate="projection", gate_rank=2)
        getattr(kernel, form)(q, k, v, 0.3).square().sum().backward()
        grads.append({n: p.grad for n, p in kernel.named_parameters()})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_extreme_gates_stay_finite():
    kernel = make_kernel("gla", 4, 8, chunk=8)
    with torch.no_grad():
        kernel.gate_bias.fill_(-3000.0)  # alpha = e^-190 per token: every product underflows, none overflows
    q, k, v = gqa_inputs(5)
    for z in forms(kernel, q, k, v, 0.3, split=9).values():
        assert torch.isfinite(z).all()


def test_bad_options_raise():
    with pytest.raises(AttnprobeError, match="normalize=False"):
        make_kernel("gla", 2, 8, feature_map="identity")
    with pytest.raises(AttnprobeError, match="'key'"):
        make_kernel("gla", 2, 8, gate="conv")


def test_equals_flash_linear_attention_reference():
    reference = fla_reference("ops/gla/naive.py")
    kernel = perturbed("gla", 4, 8, chunk=8, feature_map="identity", normalize=False)
    q, k, v = gqa_inputs(6)
    with torch.no_grad():
        ours = kernel(q, k, v, 8 ** -0.5)  # fla's reference scales q by d^-0.5 itself
        theirs, _ = reference.naive_recurrent_gla(*(x.transpose(1, 2) for x in (q, k, v, kernel.log_gates(k))))
    torch.testing.assert_close(ours, theirs.transpose(1, 2), atol=1e-5, rtol=1e-4)
