"""Edits change a site in place during a run: ablate heads, replace heads by a kernel.

An edit is a function of the site's tensor (layouts in `sites.py`) and, at attention sites, of the
`AttentionCall` that holds the layer's q, k, v after RoPE. It returns the new tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .sites import Site


@dataclass
class AttentionCall:
    """What one attention call saw: q (B,H,T,d), k and v (B,KV,S,d), positions of the T queries.

    `key_offset` is the position of k[:, :, 0]: 0 when k holds the whole past, the past length when a
    compact cache (hooks/cache.py) hands over only the new tokens' keys."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scaling: float
    window: int | None
    query_positions: torch.Tensor
    key_offset: int = 0

    @property
    def past(self) -> int:
        """How many positions precede the call's queries."""
        return self.key_offset + self.k.shape[2] - self.q.shape[2]

    @property
    def is_decode(self) -> bool:
        return self.past > 0

    def repeated_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.q.shape[1] // self.k.shape[1]
        return self.k.repeat_interleave(group, dim=1), self.v.repeat_interleave(group, dim=1)


EditFn = Callable[[torch.Tensor, "AttentionCall | None"], torch.Tensor]


@dataclass
class Edit:
    layer: int
    site: Site
    fn: EditFn
    label: str = ""
    state: dict = field(default_factory=dict)  # per-edit memory, e.g. a linear head's recurrent state
    heads: list[int] = field(default_factory=list)  # Z edits: the heads whose output is replaced
    # Z edits that replace attention: the effective attention rows (B, len(heads), rows, S) of those
    # heads, so pattern reads of a modified model see what the heads now do
    pattern_fn: Callable[["AttentionCall", torch.Tensor], torch.Tensor] | None = None
    # Z edits that put a kernel in the heads' place: that kernel, so a backend may run the layer fused
    kernel: object | None = None


_INDEX_CACHE: dict[tuple, torch.Tensor] = {}


def head_index(heads: Sequence[int], device) -> slice | torch.Tensor:
    """An index of `heads` (dim 1 of q/k/v, dim 2 of z) that costs no host sync on a GPU: a slice when they
    are consecutive, else a tensor kept on `device` (a Python list is copied there, blocking, on every use)."""
    heads = tuple(heads)
    if heads and heads == tuple(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    key = (heads, str(device))
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = torch.tensor(heads, dtype=torch.long, device=device)
    return _INDEX_CACHE[key]


def _heads_list(heads: Sequence[int] | int) -> list[int]:
    return [heads] if isinstance(heads, int) else list(heads)


def zero_heads(layer: int, heads: Sequence[int] | int) -> Edit:
    """Zero ablation: the heads' outputs z are set to 0."""
    chosen = _heads_list(heads)

    def fn(z, call):
        z = z.clone()
        z[:, :, chosen, :] = 0
        return z

    return Edit(layer, Site.Z, fn, f"zero L{layer} H{chosen}", heads=chosen)


def mean_heads(layer: int, heads: Sequence[int] | int, means: torch.Tensor) -> Edit:
    """Mean ablation: z of each head is replaced by its mean over reference text; means is (H, d)."""
    chosen = _heads_list(heads)

    def fn(z, call):
        z = z.clone()
        z[:, :, chosen, :] = means[chosen].to(z)
        return z

    return Edit(layer, Site.Z, fn, f"mean L{layer} H{chosen}", heads=chosen)


def uniform_heads(layer: int, heads: Sequence[int] | int) -> Edit:
    """The retrieval-head paper's masking: zero the heads' queries, so attention is uniform over the prefix."""
    chosen = _heads_list(heads)

    def fn(q, call):
        q = q.clone()
        q[:, chosen] = 0
        return q

    return Edit(layer, Site.Q, fn, f"uniform L{layer} H{chosen}")


def replace_heads(layer: int, heads: Sequence[int] | int, head_fn: Callable[[AttentionCall, list[int], dict], torch.Tensor]) -> Edit:
    """Replace the heads' z by `head_fn(call, heads, state) -> (B, T, len(heads), d)`; other heads keep softmax."""
    chosen = _heads_list(heads)
    edit = Edit(layer, Site.Z, lambda z, call: z, f"replace L{layer} H{chosen}", heads=chosen)

    def fn(z, call):
        if call is None:
            raise RuntimeError("replace_heads needs the attention call (q, k, v)")
        z = z.clone()
        z[:, :, head_index(chosen, z.device)] = head_fn(call, chosen, edit.state).to(z)
        return z

    edit.fn = fn
    return edit
