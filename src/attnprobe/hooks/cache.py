"""A KV cache shaped like the architecture: what a swapped model no longer needs, it does not store.

    edits = swap_edits(model, "hedgehog", layers=[3, 4])
    with backend.patched(edits):                        # the native backend
        model.hf.generate(ids, past_key_values=architecture_cache(model, edits), max_new_tokens=20)

Per layer, a KV head keeps its keys and values while any of its query heads is still softmax (under
GQA a KV head serves `group` query heads); a KV head whose query heads are all replaced keeps none.
A layer without replaced heads gets transformers' own layer (DynamicLayer, or DynamicSlidingWindowLayer
on a sliding layer), or, in a static cache (`capacity` given), a compact layer keeping every KV head. Replaced heads decode from their kernels' states, which the edits hold: a linear
head's f x d state, a sink+window head's sinks and last `window` keys (hybrid.HybridState), a
sink+window+linear head both. `nbytes()` counts all of it: the tensors the cache holds + the states.

A compact layer's `update` stores only the kept heads and hands the attention call this step's keys
and values of every KV head; the native backend's `compact-decode` path then runs the kept heads over
their own cache (one token: the split-K kernel, kernels/softmax/decode.py) and lets the replaced heads
step their states.

`StaticStep` is one decode step at fixed addresses (what a CUDA graph replays): the original over a
transformers StaticCache, or fixed-state edits over a static ArchitectureCache; what a step costs is
measured in analyses/efficiency.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer, StaticCache

from .edits import Edit, head_index
from attnprobe.errors import AttnprobeError
from .model import Model
from .sites import Site


def tensor_bytes(value) -> int:
    """Bytes of every tensor in `value` (tensors, dataclasses, dicts, lists, tuples)."""
    return sum(t.numel() * t.element_size() for t in tensor_leaves(value))


def tensor_leaves(value) -> list[torch.Tensor]:
    """The tensors in `value`, in a fixed order (what `tensor_bytes` counts and `StaticStep` copies back)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # fields marked bookkeeping (a ring's slot) aside
        return [t for f in dataclasses.fields(value) if not f.metadata.get("bookkeeping")
                for t in tensor_leaves(getattr(value, f.name))]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensor_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensor_leaves(v)]
    return []


def kept_kv_heads(n_heads: int, n_kv_heads: int, replaced: set[int]) -> list[int]:
    """KV heads with at least one query head not in `replaced`."""
    group = n_heads // n_kv_heads
    return [kv for kv in range(n_kv_heads) if not set(range(kv * group, (kv + 1) * group)) <= replaced]


class CompactLayer(CacheLayerMixin):
    """Keys and values of the kept KV heads only (all positions, or the sliding window's last ones).

    Without a sliding window a decode step writes only its own token, never copying the cache:
      - `capacity` None: buffers that grow by doubling; `keys`/`values` are views of the filled part;
      - `capacity` given (static): buffers of exactly `capacity` positions, written at a position counter kept
        on the device (`filled`), so a CUDA graph replays the step as the cache grows; `keys`/`values` are the
        whole buffers (as a transformers StaticCache holds them) and a one-token step's kept heads read them
        up to `kept_lengths` with the split-K kernel.
    A sliding window keeps its last keys by concatenation. `built_for_edits` is False for a layer whose heads
    are all softmax (a static cache keeps those layers too, so the whole step has fixed addresses)."""

    is_compileable = False
    is_croppable = False
    compact = True

    def __init__(self, kept: Sequence[int], group: int, sliding_window: int | None = None, capacity: int | None = None):
        super().__init__()
        self.kept = list(kept)
        self.capacity = capacity if sliding_window is None else None
        self.buffers = None  # (keys, values) of every position reserved so far, full attention only
        self.filled = None  # static: positions written, a device tensor
        self.built_for_edits = True
        self.kept_query_heads = [kv * group + i for kv in self.kept for i in range(group)]
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.length = 0  # positions seen
        self.past = 0  # positions before the current call
        self.kept_keys = self.kept_values = None  # what the kept heads attend over in the current decode call

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        shape = (key_states.shape[0], len(self.kept), 0, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape[:-1] + (value_states.shape[-1],))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.past = self.length
        self.length += key_states.shape[-2]
        if not self.kept:  # every head replaced: nothing to store, no copy per token
            return key_states, value_states
        kept = head_index(self.kept, key_states.device)
        if self.sliding_window is not None:
            keys = torch.cat([self.keys, key_states[:, kept]], dim=-2)
            values = torch.cat([self.values, value_states[:, kept]], dim=-2)
            self.keys, self.values = keys[:, :, -self.sliding_window + 1:], values[:, :, -self.sliding_window + 1:]
        elif self.capacity is not None:
            keys, values = self._write(key_states[:, kept], value_states[:, kept])
        else:
            keys, values = self._append(key_states[:, kept], value_states[:, kept])
        # a prefill attends over the call's own keys: keep no second reference to them
        self.kept_keys, self.kept_values = (keys, values) if self.past else (None, None)
        return key_states, value_states

    def _append(self, keys, values) -> tuple[torch.Tensor, torch.Tensor]:
        reserved = self.buffers[0].shape[2] if self.buffers is not None else 0
        if self.length > reserved:
            size = max(self.length, self.capacity or 0, 2 * reserved)
            grown = tuple(x.new_empty(x.shape[:2] + (size, x.shape[-1])) for x in (keys, values))
            for to, old in zip(grown, (self.keys, self.values)):
                to[:, :, :self.past] = old
            self.buffers = grown
        for to, new in zip(self.buffers, (keys, values)):
            to[:, :, self.past:self.length] = new
        self.keys, self.values = (x[:, :, :self.length] for x in self.buffers)
        return self.keys, self.values

    def _write(self, keys, values) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length > self.capacity:
            raise AttnprobeError(f"position {self.length - 1} does not fit a cache of {self.capacity} positions: "
                                 "build the cache for the whole context")
        if self.buffers is None:
            self.buffers = tuple(x.new_zeros(x.shape[:2] + (self.capacity, x.shape[-1])) for x in (keys, values))
            self.filled = torch.zeros((), dtype=torch.long, device=keys.device)
        index = self.filled + torch.arange(keys.shape[2], device=keys.device)
        for to, new in zip(self.buffers, (keys, values)):
            to.index_copy_(2, index, new)
        self.filled.add_(keys.shape[2])
        self.keys, self.values = self.buffers
        if keys.shape[2] == 1:
            return self.buffers
        return tuple(x[:, :, :self.length] for x in self.buffers)  # several tokens: SDPA over the filled part

    def kept_lengths(self, batch: int) -> torch.Tensor:
        """Valid positions of the kept keys for each sequence, on the device (a static layer's counter)."""
        if self.filled is not None:
            return self.filled.expand(batch)
        return torch.full((batch,), self.length, device=self.device)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.sliding_window is None:
            return self.length + query_length, 0
        offset = max(self.length - self.sliding_window + 1, 0)
        if self.length >= self.sliding_window:
            return self.sliding_window - 1 + query_length, offset
        return self.length + query_length, offset

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.sliding_window if self.sliding_window is not None else -1

    def reset(self) -> None:
        self.keys = self.values = self.kept_keys = self.kept_values = self.buffers = self.filled = None
        self.is_initialized = False
        self.length = self.past = 0


def kv_bytes(cache: Cache) -> int:
    """Bytes of the keys and values a transformers Cache holds, over its initialised layers."""
    return sum(tensor_bytes(layer.keys) + tensor_bytes(layer.values) for layer in cache.layers if layer.is_initialized)


class ArchitectureCache(Cache):
    """One layer per decoder layer: transformers' own where every head is softmax, compact elsewhere."""

    def __init__(self, model: Model, edits: Sequence[Edit] = (), capacity: int | None = None):
        info = model.info
        group = info.n_heads // info.n_kv_heads
        self.edits = list(edits)
        replaced: dict[int, set[int]] = {}
        for edit in self.edits:
            if edit.site == Site.Z and edit.kernel is not None:
                replaced.setdefault(edit.layer, set()).update(edit.heads)
        layers = []
        for layer in range(info.n_layers):
            window = info.window(layer)
            if replaced.get(layer):
                layers.append(CompactLayer(kept_kv_heads(info.n_heads, info.n_kv_heads, replaced[layer]), group, window, capacity))
            elif capacity is not None and window is None:  # static: softmax layers at fixed addresses too
                layers.append(CompactLayer(range(info.n_kv_heads), group, capacity=capacity))
                layers[-1].built_for_edits = False
            elif window is not None:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)
        self.capacity = capacity
        self.compact_layers = [layer if isinstance(layer, CompactLayer) else None for layer in layers]

    def kv_bytes(self) -> int:
        """Bytes of the keys and values the cache holds."""
        return kv_bytes(self)

    def state_bytes(self) -> int:
        """Bytes of the replaced heads' kernel states (held by their edits)."""
        return sum(tensor_bytes(edit.state.get("kernel")) for edit in self.edits)

    def nbytes(self) -> int:
        return self.kv_bytes() + self.state_bytes()


def architecture_cache(model: Model, edits: Sequence[Edit] = (), capacity: int | None = None) -> ArchitectureCache:
    """The cache for generating with `edits` on (inside the native backend's `patched(edits)`); `capacity`:
    positions to reserve for the kept heads up front (the context a measurement ends at)."""
    overlapping = {}
    for edit in edits:
        if edit.site == Site.Z and edit.kernel is not None:
            seen = overlapping.setdefault(edit.layer, set())
            if seen & set(edit.heads):
                raise AttnprobeError(f"two kernel edits replace heads {sorted(seen & set(edit.heads))} of layer {edit.layer}: give each head one kernel")
            seen.update(edit.heads)
    return ArchitectureCache(model, edits, capacity)


STATIC_ONLY = ("a static decode step needs the original model or edits that all put fixed-state kernels or sink + window "
               "heads without a linear part in their heads' place, in a model without sliding layers: decode this "
               "architecture eagerly")


def graph_capturable(model: Model, edits: Sequence[Edit]) -> bool:
    """Whether a decode step keeps every tensor it reads at a fixed address, so one step can be replayed as a CUDA
    graph: no edit (the original, over a StaticCache), or edits that all replace heads by kernels with a fixed
    state and no kept tokens (linear, gated, delta-rule) or by sink + window heads (alone or in a Liger mix;
    their ring's slot on the device, kernels/hybrid/ring.py) in a model without sliding layers: the softmax
    heads left read a static ArchitectureCache (capacity given: positions counted on the device). A window
    that folds evicted tokens into a linear state, or a sliding layer, keeps Python-side positions a replay
    would not advance."""
    from attnprobe.kernels.hybrid.ring import ring_part

    if not edits:
        return True
    if any(model.info.window(layer) is not None for layer in range(model.info.n_layers)):
        return False
    return all(edit.site == Site.Z and edit.kernel is not None
               and (edit.kernel.cached_tokens == 0 or ring_part(edit.kernel) is not None) for edit in edits)


class StaticStep:
    """One greedy decode step whose inputs and states stay at fixed addresses, so it can be captured once as a
    CUDA graph and replayed: the token and its position are buffers updated in place, each replaced head's new
    state is copied back into the tensors it was read from (a sink + window ring is written in place at its
    device slot), and the original keeps its keys and values in a transformers StaticCache, a hybrid its
    softmax heads' in a static ArchitectureCache. Called eagerly it is an ordinary decode step (what CPU
    tests check)."""

    def __init__(self, model: Model, edits: Sequence[Edit], cache, token: torch.Tensor, position: int):
        from attnprobe.kernels.hybrid.ring import ring_part, ring_slot, ring_steady

        if not graph_capturable(model, edits):
            raise AttnprobeError(STATIC_ONLY)
        if isinstance(cache, ArchitectureCache) and cache.capacity is None and not all(
                layer is not None and not layer.kept for layer in cache.compact_layers):
            raise AttnprobeError("the softmax heads of a static step read a static cache: build it with "
                                 "architecture_cache(model, edits, capacity=context)")
        for edit in edits:  # a ring's slot lives in its state from the first step on (fixed leaves for the copy-back)
            window, state = ring_part(edit.kernel), edit.state.get("kernel")
            state = state[0] if isinstance(state, tuple) else state
            if window is not None and not ring_steady(window, state):
                raise AttnprobeError(f"layer {edit.layer}'s window and sinks are not full yet: a static step of a windowed head "
                                     f"starts past {window.window + window.sinks} tokens, so prefill at least that many")
            if window is not None:
                ring_slot(window, state)
        held = cache.capacity if isinstance(cache, ArchitectureCache) else max(layer.get_max_length() for layer in cache.layers)
        if held is not None and 0 <= held <= position:
            raise AttnprobeError(f"a step at position {position} does not fit a cache of {held} positions: build the cache for the whole context")
        self.model, self.edits, self.cache = model, list(edits), cache
        self.token = token.clone()
        self.position = torch.full_like(token, position)

    def __call__(self) -> torch.Tensor:
        before = [edit.state.get("kernel") for edit in self.edits]
        logits = self.model.hf(input_ids=self.token, cache=self.cache, position_ids=self.position, use_cache=True).logits
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)
        for edit, old in zip(self.edits, before):
            new = edit.state["kernel"]
            for to, value in zip(tensor_leaves(old), tensor_leaves(new), strict=True):
                if to.shape != value.shape:
                    raise AttnprobeError(f"layer {edit.layer}'s {edit.kernel.name} state changed shape in a decode step: decode it eagerly")
                if to.data_ptr() != value.data_ptr():
                    to.copy_(value)
            edit.state["kernel"] = old
        return self.token


def decode_cache(model: Model, edits: Sequence[Edit], context: int, static: bool):
    """The cache a measurement decodes through: the architecture's own, or for the original in a static
    decode a StaticCache of exactly `context` positions (the keys a DynamicCache holds at the end)."""
    if static and not edits:
        return StaticCache(config=model.hf.config, max_cache_len=context)
    return architecture_cache(model, edits, capacity=context if edits else None)


def cache_nbytes(cache) -> int:
    """Keys and values a cache holds, plus the replaced heads' states for an ArchitectureCache."""
    return cache.nbytes() if isinstance(cache, ArchitectureCache) else kv_bytes(cache)
