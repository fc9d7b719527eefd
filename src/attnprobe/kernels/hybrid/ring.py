"""A sink + window decode step with the ring buffer's slot on the device, so a CUDA graph can replay it.

`HybridKernel.step` picks the slot a token overwrites (position % window) in Python: a replayed graph would
write the slot it was captured with. Once the window and the sinks are full (position >= window + sinks,
the steady state of any long decode) the step below does the same work with the slot a device tensor
(`HybridState.slot`, made at the first steady step and advanced in place), the token written with
index_copy_, and the exact softmax over sinks + window read by the split-K kernel
(kernels/softmax/decode.py) with every key valid. Before the steady state, and for kernels that fold evicted
tokens into a linear state (window+linear, sink+window+linear), it is `kernel.step` itself.
A Liger mix (sink+window+gdn) steps its window here and its recurrent part as `recurrent_step` says.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..softmax.decode import split_k_decode
from .kernel import HybridKernel, HybridState
from .mix import MixKernel


def ring_part(kernel) -> HybridKernel | None:
    """The sink + window kernel a ring step can run: the kernel itself, or a Liger mix's exact part, when it
    keeps no feature map; else None."""
    window = kernel.exact if isinstance(kernel, MixKernel) else kernel
    return window if isinstance(window, HybridKernel) and window.feature_map is None else None


def ring_steady(kernel: HybridKernel, state: HybridState) -> bool:
    """Whether the step's shapes no longer change: no feature map, window and sinks full."""
    return (kernel.feature_map is None and state.window_k.shape[2] == kernel.window
            and state.length - kernel.window >= kernel.sinks)


def ring_slot(kernel: HybridKernel, state: HybridState) -> torch.Tensor:
    """The state's device slot (position % window), made on first use and kept in the state from then on."""
    if state.slot is None:
        state.slot = torch.full((1,), state.length % kernel.window, dtype=torch.long, device=state.window_k.device)
    return state.slot


def ring_step(kernel: HybridKernel, state: HybridState, q, k, v, scaling) -> tuple[torch.Tensor, HybridState]:
    """One token (q, k, v (B, H, 1, d)); the window is written in place, the slot advanced in place."""
    if q.shape[2] != 1 or not ring_steady(kernel, state):
        return kernel.step(state, q, k, v, scaling)
    slot = ring_slot(kernel, state)
    for ring, new in ((state.window_k, kernel.stored(k)), (state.window_v, kernel.stored(v))):
        ring.index_copy_(2, slot, new.to(ring.dtype))
    slot.add_(1).remainder_(kernel.window)
    keys, values = (kernel.per_head(torch.cat(x, dim=2)) for x in ((state.sink_k, state.window_k), (state.sink_v, state.window_v)))
    lengths = torch.full((q.shape[0],), keys.shape[2], device=q.device)
    z = split_k_decode(q, keys.to(q.dtype), values.to(q.dtype), lengths, scaling)
    return z, replace(state, length=state.length + 1, slot=slot)


def mix_ring_step(kernel: MixKernel, state, q, k, v, scaling, recurrent_step) -> tuple[torch.Tensor, tuple]:
    """A Liger mix: the window through `ring_step`, the recurrent part through `recurrent_step(kernel,
    state, q, k, v, scaling)` (the decode route of its family), mixed as `MixKernel` mixes them."""
    z_exact, exact_state = ring_step(kernel.exact, state[0], q, k, v, scaling)
    z_recurrent, recurrent_state = recurrent_step(kernel.recurrent, state[1], q, k, v, scaling)
    return kernel._mix(z_exact, z_recurrent), (exact_state, recurrent_state)
