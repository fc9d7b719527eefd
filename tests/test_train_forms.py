"""The gated families' chunked forms that train at 2K-8K tokens where fla's backward does not run (scalar decay,
the delta rules): every chunk at once, held equal, forward and backward, to the references written from the
papers (the recurrence, the explicit matrices) and to the chunk-by-chunk forms they replace."""
from __future__ import annotations

import pytest
import torch

from attnprobe.kernels.deltanet.kernel import wy_chunk, wy_chunked
from attnprobe.kernels.deltanet.naive import delta_recurrent
from attnprobe.kernels.decay.naive import decay_weights
from attnprobe.kernels.dispatch import torch_forms
from attnprobe.kernels.gla import chunk as forms
from attnprobe.kernels.registry import KERNELS, make_kernel

B, H, T, D = 2, 3, 75, 8  # T not a multiple of the chunk: the last chunk is padded


def _inputs(generator, dtype=torch.float64, gate_channels=1):
    q, k, v = (torch.randn(B, H, T, D, generator=generator, dtype=dtype) for _ in range(3))
    log_alpha = -torch.rand(B, H, T, gate_channels, generator=generator, dtype=dtype) * 0.3
    return q, k, v, log_alpha


def _grads(output, leaves, generator):
    upstream = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    return torch.autograd.grad(output, leaves, upstream, retain_graph=True)


@pytest.mark.parametrize("chunk", [16, 32, 100])
def test_scalar_chunked_equals_the_decay_matrix(chunk):
    generator = torch.Generator().manual_seed(0)
    leaves = [x.requires_grad_() for x in _inputs(generator)]
    q, k, v, log_alpha = leaves
    o, state = forms.scalar_chunked(q, k, v, log_alpha, chunk)
    want = decay_weights(q, k, log_alpha[..., 0], torch.arange(T)) @ v
    torch.testing.assert_close(o, want)
    _, looped = forms.chunked(q, k, v, log_alpha, None, chunk)  # the chunk-by-chunk form's final state
    torch.testing.assert_close(state, looped)
    for got, ref in zip(_grads(o, leaves, torch.Generator().manual_seed(1)), _grads(want, leaves, torch.Generator().manual_seed(1))):
        torch.testing.assert_close(got, ref)
    (grad_state,) = torch.autograd.grad(state.sum(), log_alpha)
    (grad_looped,) = torch.autograd.grad(looped.sum(), log_alpha)
    torch.testing.assert_close(grad_state, grad_looped)


@pytest.mark.parametrize("channels", [1, D])  # Gated DeltaNet (and DeltaNet with log a = 0), KDA
def test_wy_chunked_equals_the_recurrence(channels):
    generator = torch.Generator().manual_seed(2)
    q, k, v, log_alpha = _inputs(generator, gate_channels=channels)
    q, k = (x / x.norm(dim=-1, keepdim=True) for x in (q, k))
    beta = torch.rand(B, H, T, generator=generator, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, log_alpha)]
    o, state = wy_chunked(*leaves, 16)
    want = delta_recurrent(*leaves)
    torch.testing.assert_close(o, want)
    whole, whole_state = wy_chunk(*leaves, q.new_zeros(B, H, D, D))  # one chunk: the quadratic form
    torch.testing.assert_close(state, whole_state)
    for got, ref in zip(_grads(o, leaves, torch.Generator().manual_seed(3)), _grads(want, leaves, torch.Generator().manual_seed(3))):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name, options", [("decay", {"data_dependent": True}), ("gated-deltanet", {}), ("kda", {}),
                                           ("deltanet", {})])
def test_kernels_train_through_their_chunked_form_as_through_the_quadratic(name, options):
    """What `train_forward` runs beyond the quadratic range equals the quadratic form: z and every gradient,
    the kernel's own parameters included."""
    torch.manual_seed(0)
    kernel = make_kernel(name, H, D, chunk=16, **options)
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(0.1 * torch.randn_like(p))  # off the init, so the data-dependent parts matter
    generator = torch.Generator().manual_seed(4)
    inputs = [x.float().requires_grad_() for x in _inputs(generator)[:3]]
    params = [p for p in kernel.parameters() if p.requires_grad]
    results = []
    with torch_forms():
        for form in (kernel.quadratic, lambda *a: kernel.prefill(*a)[0]):
            z = form(*inputs, D ** -0.5)
            results.append((z, _grads(z, inputs + params, torch.Generator().manual_seed(5))))
    (z_quadratic, g_quadratic), (z_chunked, g_chunked) = results
    torch.testing.assert_close(z_chunked, z_quadratic, rtol=1e-4, atol=1e-5)
    for got, ref in zip(g_chunked, g_quadratic):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_family_trains_beyond_the_quadratic_range(name):
    """Past QUADRATIC_UP_TO tokens `train_forward` takes each family's chunked (or blocked) form: it has a backward
    that reaches the inputs and every learnable parameter, so no family is left without one on a CPU machine."""
    from attnprobe.kernels.base import QUADRATIC_UP_TO

    torch.manual_seed(0)
    kernel = make_kernel(name, 2, 16)
    q, k, v = (torch.randn(1, 2, QUADRATIC_UP_TO + 77, 16, requires_grad=True) for _ in range(3))
    kernel.train_forward(q, k, v, 0.25).square().sum().backward()
    assert all(x.grad is not None and x.grad.isfinite().all() for x in (q, k, v)) and q.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.isfinite().all() for p in kernel.parameters() if p.requires_grad)
