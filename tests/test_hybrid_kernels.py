"""Token hybrids against references written out here from their papers (not the kernel's own naive.py)."""
from __future__ import annotations

import math

import pytest
import torch

from attnprobe.kernels.registry import make_kernel


def _qkv(seed, length=23, heads=2, dim=6):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, length, dim, generator=generator) for _ in range(3)]


def _forms(kernel, q, k, v, scaling, split=9):
    with torch.no_grad():
        head, state = kernel.prefill(q[:, :, :split], k[:, :, :split], v[:, :, :split], scaling)
        tail, _ = kernel.decode(state, q[:, :, split:], k[:, :, split:], v[:, :, split:], scaling)
        rows = torch.arange(q.shape[2])
        return {"quadratic": kernel.quadratic(q, k, v, scaling), "chunked": kernel(q, k, v, scaling),
                "recurrent": torch.cat([head, tail], dim=2), "weights @ v": kernel.attention_weights(q, k, scaling, rows) @ v}


def _sink_window(q, k, v, scaling, window, sinks):
    expected = torch.zeros_like(v)
    for t in range(q.shape[2]):
        keys = sorted({s for s in range(t + 1) if s < sinks or t - s < window})
        scores = torch.stack([(q[:, :, t] * k[:, :, s]).sum(-1) * scaling for s in keys], dim=-1)
        weights = torch.softmax(scores, dim=-1)
        expected[:, :, t] = sum(weights[..., i, None] * v[:, :, s] for i, s in enumerate(keys))
    return expected


@pytest.mark.parametrize("window,sinks", [(5, 2), (3, 0), (1, 4)])
def test_sink_window_is_softmax_over_the_sinks_and_the_window(window, sinks):
    """StreamingLLM: each query attends by softmax to keys s < sinks and t - window < s <= t, to no other."""
    q, k, v = _qkv(window)
    scaling = 0.4
    expected = _sink_window(q, k, v, scaling, window, sinks)
    kernel = make_kernel("sink+window", 2, 6, window=window, sinks=sinks, chunk=4)
    for form, z in _forms(kernel, q, k, v, scaling).items():
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4, msg=form)


@pytest.mark.parametrize("name,sinks", [("window+linear", 0), ("sink+window+linear", 3)])
def test_window_linear_is_the_lolcats_formula(name, sinks):
    """LoLCATs eq. (6): y_t = [sum_{window} f exp(q.k/sqrt d - c) v + sum_{older} (1-f) phi(q).phi(k) v]
    / [the same sums without v], with Hedgehog's phi_q(q) . phi_k(k), phi(x) = softmax([Wx, -Wx]) with one W for
    queries and another for keys, and f = sigmoid(window logit)."""
    q, k, v = _qkv(sinks + 1)
    scaling, window = 0.4, 4
    kernel = make_kernel(name, 2, 6, window=window, sinks=sinks, chunk=4)
    generator = torch.Generator().manual_seed(3)
    maps = kernel.feature_map
    with torch.no_grad():
        for weight in (maps.query_weight, maps.key_weight):  # different draws: the two maps differ
            weight.add_(0.3 * torch.randn(weight.shape, generator=generator))
        kernel.window_logit.copy_(torch.tensor([-1.0, 0.5]))

    def phi(x, head, weight):
        y = x @ weight[head]
        return torch.softmax(torch.cat([y, -y]), dim=0)

    expected = torch.zeros_like(v)
    with torch.no_grad():
        _lolcats(kernel, q, k, v, scaling, window, sinks, phi, expected)
    for form, z in _forms(kernel, q, k, v, scaling).items():
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4, msg=form)


def _lolcats(kernel, q, k, v, scaling, window, sinks, phi, expected):
    for head in range(2):
        f = 1 / (1 + math.exp(-kernel.window_logit[head].item()))
        for t in range(q.shape[2]):
            exact = [s for s in range(t + 1) if t - s < window or s < sinks]
            c = max(float(q[0, head, t] @ k[0, head, s]) * scaling for s in exact)
            num, den = torch.zeros(6), 0.0
            for s in range(t + 1):
                if s in exact:
                    weight = f * math.exp(float(q[0, head, t] @ k[0, head, s]) * scaling - c)
                else:
                    maps = kernel.feature_map
                    weight = (1 - f) * float(phi(q[0, head, t], head, maps.query_weight) @ phi(k[0, head, s], head, maps.key_weight))
                num, den = num + weight * v[0, head, s], den + weight
            expected[0, head, t] = num / den


def test_sink_window_gdn_mixes_the_two_outputs():
    """Liger Attention's form: f * (sink+window softmax) + (1 - f) * (Gated DeltaNet over every token)."""
    from attnprobe.kernels.deltanet import l2_normalize
    from attnprobe.kernels.deltanet.naive import delta_recurrent

    q, k, v = _qkv(4)
    kernel = make_kernel("sink+window+gdn", 2, 6, window=4, sinks=2, chunk=4)
    with torch.no_grad():
        kernel.mix_logit.copy_(torch.tensor([-1.0, 2.0]))
        kernel.recurrent.beta_weight.normal_(generator=torch.Generator().manual_seed(0))
        beta, log_alpha = kernel.recurrent.coefficients(k)
        gdn = delta_recurrent(l2_normalize(q), l2_normalize(k), v, beta, log_alpha)
    f = torch.sigmoid(torch.tensor([-1.0, 2.0]))[None, :, None, None]
    expected = f * _sink_window(q, k, v, 0.4, 4, 2) + (1 - f) * gdn
    for form, z in _forms(kernel, q, k, v, 0.4).items():
        torch.testing.assert_close(z, expected, atol=1e-5, rtol=1e-4, msg=form)


@pytest.mark.parametrize("name", ["sink+window", "window+linear", "sink+window+linear", "sink+window+gdn"])
def test_training_form_has_the_quadratic_gradients(name):
    """A conversion trains hybrids through the blocked prefill, not the T x T form: its output and the gradients
    of q, k, v and the kernel's own parameters equal the quadratic reference's."""
    q, k, v = (x.requires_grad_() for x in _qkv(11, length=29))
    kernel = make_kernel(name, 2, 6, window=4, sinks=2, chunk=4)
    assert not (kernel.exact if name == "sink+window+gdn" else kernel).quadratic_trains
    inputs = [q, k, v, *kernel.parameters()]
    target = torch.randn(1, 2, 29, 6, generator=torch.Generator().manual_seed(5))
    grads = {}
    for form in ("train_forward", "quadratic"):
        z = getattr(kernel, form)(q, k, v, 0.4)
        grads[form] = (z, torch.autograd.grad((z * target).sum(), inputs))
    torch.testing.assert_close(grads["train_forward"][0], grads["quadratic"][0], atol=1e-5, rtol=1e-4)
    for trained, reference in zip(grads["train_forward"][1], grads["quadratic"][1]):
        torch.testing.assert_close(trained, reference, atol=1e-5, rtol=1e-4)
