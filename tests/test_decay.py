"""Scalar decay per head: every form equals RetNet's formula under GQA; half-life init; fla's reference."""
from __future__ import annotations

import math

import pytest
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.decay import half_life_for_distance, naive, retnet_half_lives
from attnprobe.kernels.registry import make_kernel
from fla_refs import fla_reference
from test_gla import forms, gqa_inputs, perturbed

OPTIONS = [{}, {"data_dependent": True}, {"half_life": [1.0, 3.0, 10.0, 100.0], "feature_map": "identity", "normalize": False}]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_every_form_is_the_retnet_formula_under_gqa(options):
    kernel = perturbed("decay", 4, 8, chunk=8, **options)
    q, k, v = gqa_inputs(2)
    with torch.no_grad():
        phi_q, phi_k = kernel.features(q, k, 0.3)
        expected = naive.decay_weights(phi_q, phi_k, kernel.log_gates(k)[..., 0], torch.arange(29), kernel.normalize) @ v
    for form, z in forms(kernel, q, k, v, 0.3, split=12).items():
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4, msg=form)


def test_fixed_decay_halves_a_weight_every_half_life():
    kernel = make_kernel("decay", 3, 8, half_life=[2.0, 16.0, 300.0], feature_map="identity", normalize=False)
    gamma = torch.exp(kernel.log_gates(torch.randn(1, 3, 4, 8)))[0, :, :, 0]
    torch.testing.assert_close(gamma ** torch.tensor([2.0, 16.0, 300.0])[:, None], torch.full((3, 4), 0.5))
    default = make_kernel("decay", 4, 8)  # RetNet: gamma_h = 1 - 2^(-5-h)
    torch.testing.assert_close(torch.sigmoid(default.decay_logit), 1 - 2.0 ** -torch.arange(5.0, 9.0))
    assert retnet_half_lives(1)[0] == pytest.approx(math.log(2) / -math.log(1 - 1 / 32))


def test_half_life_from_mean_attention_distance():
    """Weights decaying as gamma^n have mean distance D: the half-life chosen for D reproduces it."""
    for distance in (0.5, 4.0, 60.0):
        gamma = 0.5 ** (1 / half_life_for_distance([distance])[0])
        n = torch.arange(20000, dtype=torch.float64)
        weights = gamma ** n
        assert float((n * weights).sum() / weights.sum()) == pytest.approx(distance, rel=1e-6)


def test_a_sink_fades_with_the_decay():
    """A key every query matches best (a sink) at position 0: under a decay its share falls as gamma^t."""
    dim, length = 8, 200
    k = 0.1 * torch.randn(1, 1, length, dim)
    k[:, :, 0] = 3.0
    q = torch.full((1, 1, length, dim), 1.0)
    softmax = make_kernel("softmax", 1, dim).attention_weights(q, k, 1.0, torch.arange(length))[0, 0, :, 0]
    decay = make_kernel("decay", 1, dim, half_life=8.0).attention_weights(q, k, 1.0, torch.arange(length))[0, 0, :, 0]
    assert softmax[-1] > 0.2 and decay[-1] < 1e-6 and decay[8] < decay[0] / 2


def test_bad_half_life_raises():
    with pytest.raises(AttnprobeError, match="one per head"):
        make_kernel("decay", 3, 8, half_life=[1.0, 2.0])


def test_equals_flash_linear_attention_reference():
    reference = fla_reference("ops/simple_gla/naive.py")
    kernel = perturbed("decay", 4, 8, chunk=8, data_dependent=True, feature_map="identity", normalize=False)
    q, k, v = gqa_inputs(7)
    with torch.no_grad():
        ours = kernel(q, k, v, 0.3)
        theirs, _ = reference.naive_recurrent_simple_gla(*(x.transpose(1, 2) for x in (q, k, v, kernel.log_gates(k)[..., 0])), scale=0.3)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), atol=1e-5, rtol=1e-4)
