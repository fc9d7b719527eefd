"""The fused Triton delta-rule decode step (kernels/deltanet/decode.py) against the torch step, through Triton's
interpreter on CPU (as tests/test_triton.py runs the other kernels), and the decode route that picks it."""
from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton's import: its library functions interpret too

import pytest
import torch

from attnprobe.errors import AttnprobeError

pytest.importorskip("triton", reason="triton is not installed on this platform")

from attnprobe.kernels.deltanet import decode  # noqa: E402
from attnprobe.kernels.registry import make_kernel  # noqa: E402
from interpreted import interpreted as interpreted_modules  # noqa: E402


@pytest.fixture(scope="module")
def interpreted():
    with interpreted_modules(decode) as (module,):
        yield module


def trained_like(name: str, heads: int, dim: int):
    """A kernel whose beta and gate depend on the key (nonzero weights), as after training."""
    torch.manual_seed(1)
    kernel = make_kernel(name, heads, dim)
    with torch.no_grad():
        for param in kernel.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return kernel


@pytest.mark.parametrize("name", ["deltanet", "gated-deltanet", "kda"])
@pytest.mark.parametrize("dv", [16, 80])
def test_the_fused_step_equals_the_torch_step(interpreted, name, dv):
    kernel = trained_like(name, 3, 16)
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 3, 9, 16, generator=gen) for _ in range(2))
    v = torch.randn(2, 3, 9, dv, generator=gen)
    _, state = kernel.prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5], 0.25)
    want, want_state = kernel.decode(state.clone(), q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], 0.25)
    kept = state.clone()
    got, got_state = interpreted.fused_delta_decode(kernel, kept, q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_state, want_state, atol=1e-5, rtol=1e-5)
    assert got_state.data_ptr() == kept.data_ptr()  # advanced in place: a CUDA graph's replay sees it


def test_the_route_takes_the_fused_step_where_triton_runs_and_fla_does_not(interpreted, monkeypatch):
    from attnprobe.hooks.swap import DECODERS, decode_route
    from attnprobe.kernels import dispatch

    kernel = trained_like("kda", 2, 16)
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    assert decode_route(kernel, q, v) == "torch"
    with dispatch.triton_on_cpu():
        assert decode_route(kernel, q, v) == "triton-delta"
        assert decode_route(make_kernel("hedgehog", 2, 16), q, v) == "triton"
        wide = torch.randn(1, 2, 6, 24)  # a key dim the Triton step cannot take: the torch step
        assert decode_route(make_kernel("kda", 2, 24), wide, wide) == "torch"
        _, state = kernel.prefill(q[:, :, :4], k[:, :, :4], v[:, :, :4], 0.25)
        got, _ = DECODERS["triton-delta"](kernel, state.clone(), q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], 0.25)
        torch.testing.assert_close(got, kernel.quadratic(q, k, v, 0.25)[:, :, 4:], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(dispatch, "use_fla", lambda x: True)  # fla's op, where it runs, comes first
    with dispatch.triton_on_cpu():
        assert decode_route(make_kernel("gated-deltanet", 2, 16), q, v) == "fla" and decode_route(kernel, q, v) == "triton-delta"


def test_a_state_the_step_cannot_advance_in_place_is_refused():
    state = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    x = torch.zeros(1, 2, 16)
    with pytest.raises(AttnprobeError, match="keep the state the prefill returned"):
        decode.delta_decode_step(x, x, x, torch.zeros(1, 2), torch.zeros(1, 2, 1), state)

