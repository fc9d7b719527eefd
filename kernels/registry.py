"""Kernel names and the one constructor: `make_kernel(name, n_heads, head_dim, **options)`.

    softmax              exact causal softmax (the teacher; replacing a head with it changes nothing)
    elu, relu            normalized linear attention with elu(x)+1 / relu(x)        options: chunk
    taylor               Based 2nd-order Taylor map                                 options: feature_dim, seed, chunk
    performer            FAVOR+ positive random features                            options: n_features, seed, chunk
    hedgehog             softmax([Wx, -Wx]), W learnable per head                   options: chunk
    window+linear        LoLCATs: softmax on the last `window` + linear for older   options: window, sinks, feature_map, window_weight, chunk
    sink+window          StreamingLLM: softmax on the first `sinks` + last `window` options: window, sinks, chunk
    sink+window+linear   the above plus a linear term for the evicted middle         options: window, sinks, feature_map, window_weight, chunk
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from attnprobe.hooks.errors import AttnprobeError

from .feature_maps import FEATURE_MAPS
from .hybrid import HybridKernel
from .linear import LinearKernel
from .softmax import CHUNK, Kernel, SoftmaxKernel

LINEAR = ("elu", "relu", "taylor", "performer", "hedgehog")
HYBRIDS = {  # name -> (window, sinks, default feature map)
    "window+linear": (64, 0, "hedgehog"),
    "sink+window": (64, 4, None),
    "sink+window+linear": (64, 4, "hedgehog"),
}
KERNELS = ("softmax", *LINEAR, *HYBRIDS)


def _map_options(map_name: str) -> set[str]:
    return set(inspect.signature(FEATURE_MAPS[map_name].__init__).parameters) - {"self", "n_heads", "head_dim"}


def _check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise AttnprobeError(f"kernel '{name}' has no option {', '.join(unknown)}: valid options are {', '.join(sorted(allowed)) or 'none'}")


def make_kernel(name: str, n_heads: int, head_dim: int, **options) -> Kernel:
    """Build kernel `name` for n_heads heads of size head_dim; options as listed in this module's docstring."""
    options = {key: value for key, value in options.items() if value is not None}
    chunk = options.pop("chunk", CHUNK)
    if name == "softmax":
        _check_options(name, options, set())
        return SoftmaxKernel(n_heads, head_dim, chunk)
    if name in LINEAR:
        _check_options(name, options, _map_options(name))
        return LinearKernel(FEATURE_MAPS[name](n_heads, head_dim, **options), chunk)
    if name in HYBRIDS:
        window, sinks, map_name = HYBRIDS[name]
        map_name = options.pop("feature_map", map_name) if map_name else None
        if map_name is not None and map_name not in FEATURE_MAPS:
            raise AttnprobeError(f"unknown feature map '{map_name}' for {name}: choose one of {', '.join(FEATURE_MAPS)}")
        own = {"window", "sinks", "window_weight"} if map_name else {"window", "sinks"}
        map_allowed = _map_options(map_name) if map_name else set()
        _check_options(name, options, own | map_allowed)
        feature_map = FEATURE_MAPS[map_name](n_heads, head_dim, **{k: options[k] for k in map_allowed & set(options)}) if map_name else None
        hybrid = {k: options[k] for k in own & set(options)}
        hybrid.setdefault("window", window)
        hybrid.setdefault("sinks", sinks)
        return HybridKernel(n_heads, head_dim, name, feature_map=feature_map, chunk=chunk, **hybrid)
    raise AttnprobeError(f"unknown kernel '{name}': choose one of {', '.join(KERNELS)}")


def select_heads(kernel: Kernel, heads: Sequence[int]) -> Kernel:
    """A copy of `kernel` covering only the given head indices (its per-head parameters sliced)."""
    heads = list(heads)
    chosen = make_kernel(kernel.name, len(heads), kernel.head_dim, **kernel.options())
    index = torch.tensor(heads, dtype=torch.long)
    chosen.load_state_dict({key: value[index].clone() for key, value in kernel.state_dict().items()})
    return chosen
