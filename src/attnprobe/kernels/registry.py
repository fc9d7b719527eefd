"""Every kernel name, and the one constructor: `make_kernel(name, n_heads, head_dim, **options)`.

Each family folder exports FAMILY = {name: Family(build, kind, summary)}; registering a family is
one entry in FAMILIES. `make_kernel`, the CLI, the architectures catalogue and the fitting code read
this table and ask the kernels themselves what they are (learnable, state size, cached tokens).
"""
from __future__ import annotations

from typing import Sequence

import torch

from attnprobe.errors import AttnprobeError

from . import decay, deltanet, gla, hybrid, linear, softmax, sparse
from .base import CHUNK, Family, Kernel

FAMILIES: dict[str, Family] = {**softmax.FAMILY, **linear.FAMILY, **gla.FAMILY, **decay.FAMILY, **deltanet.FAMILY,
                               **hybrid.FAMILY, **sparse.FAMILY}
KERNELS = tuple(FAMILIES)


def names(kind: str) -> list[str]:
    """The registered kernel names of one kind ("softmax", "linear", "hybrid")."""
    return [name for name, family in FAMILIES.items() if family.kind == kind]


def make_kernel(name: str, n_heads: int, head_dim: int, **options) -> Kernel:
    """Build kernel `name` for n_heads heads of size head_dim; `chunk` and the family's own options."""
    if name not in FAMILIES:
        raise AttnprobeError(f"unknown kernel '{name}': choose one of {', '.join(KERNELS)}")
    options = {key: value for key, value in options.items() if value is not None}
    chunk = options.pop("chunk", CHUNK)
    return FAMILIES[name].build(name, n_heads, head_dim, chunk, **options)


def select_heads(kernel: Kernel, heads: Sequence[int]) -> Kernel:
    """A copy of `kernel` covering only the given head indices (its per-head parameters sliced)."""
    heads = list(heads)
    chosen = make_kernel(kernel.name, len(heads), kernel.head_dim, **kernel.options())
    index = torch.tensor(heads, dtype=torch.long)
    chosen.load_state_dict({key: value[index].clone() for key, value in kernel.state_dict().items()})
    return chosen
