"""Token hybrids: exact softmax over sink and recent tokens, optionally a linear term for the rest.

For query t and key s <= t:
    exact(s, t)   t - s < window, or s < sinks               weight  f * exp(score - m_t)
    linear(s, t)  otherwise, and s >= sinks (feature map set)  weight  (1 - f) * phi(q_t) . phi(k_s)
with m_t the row maximum over the exact keys and ONE shared denominator (LoLCATs). f = sigmoid(a)
is a learnable scalar per head, a initialised to sigmoid^-1(0.1) as in the reference. Without a
feature map the kernel is StreamingLLM's sink + window softmax.

The recurrent state holds the sink keys, the last `window` keys and the linear state of the
evicted middle, so decoding costs O(sinks + window + f d) per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from attnprobe.errors import AttnprobeError

from ..base import CHUNK, Kernel, as_fp32, safe_ratio
from ..linear import FeatureMap, LinearState
from ..linear.feature_maps import PerformerMap
from .naive import hybrid_weights

# score elements per group of blocks in a prefill: big on a GPU (few launches), cache-sized on a CPU
GROUP_SCORES_CUDA, GROUP_SCORES_CPU = 1 << 25, 1 << 20


@dataclass
class HybridState:
    sink_k: torch.Tensor  # (B, KV heads, <= sinks, d): keys at positions 0.. (`Kernel.stored`)
    sink_v: torch.Tensor
    window_k: torch.Tensor  # (B, KV heads, <= window, d): keys at the last positions
    window_v: torch.Tensor
    linear: LinearState | None  # keys evicted from the window, past the sinks
    length: int
    # the ring's next slot on the device, once a graph-replayable step runs (ring.py); bookkeeping, not state bytes
    slot: torch.Tensor | None = field(default=None, metadata={"bookkeeping": True})


class HybridKernel(Kernel):
    def __init__(self, n_heads: int, head_dim: int, name: str, window: int = 64, sinks: int = 0,
                 feature_map: FeatureMap | None = None, window_weight: float = 0.1, chunk: int = CHUNK) -> None:
        super().__init__(n_heads, head_dim, chunk)
        if window < 1 or sinks < 0:
            raise AttnprobeError(f"{name} needs window >= 1 and sinks >= 0; got window={window}, sinks={sinks}")
        if isinstance(feature_map, PerformerMap):
            # its features come with a per-query scale that cancels only in a pure linear ratio
            raise AttnprobeError(f"{name} cannot use performer features: choose hedgehog, elu, relu or taylor")
        self.name, self.window, self.sinks, self.feature_map = name, window, sinks, feature_map
        if feature_map is not None:
            logit = math.log(window_weight / (1 - window_weight))
            self.window_logit = nn.Parameter(torch.full((n_heads,), logit))

    # training takes the blocked prefill: each query touches sinks + 2 window keys instead of all T, 4x less
    # time forward and backward than the T x T form at 512 tokens (CPU, window 64); the gradients are equal
    quadratic_trains = False

    @property
    def cached_tokens(self) -> int:
        return self.window + self.sinks

    def state_numbers(self, d_v=None):
        return 0 if self.feature_map is None else self.feature_map.dim * ((d_v or self.head_dim) + 1)

    def options(self):
        options = {"window": self.window, "sinks": self.sinks, "chunk": self.chunk}
        if self.feature_map is not None:
            options.update(feature_map=self.feature_map.name, **self.feature_map.options())
        return options

    def _mix(self, q, k, v, scaling, exact=None, phi_q=None, phi_k=None, middle=None, linear=None):
        """z for queries q over keys k (the exact ones where `exact`, every one where None), plus phi weights
        where `middle` and the linear state of older keys; any number of leading batch dims."""
        scores = (q @ k.transpose(-1, -2)) * scaling
        if exact is not None:
            scores = scores.masked_fill(~exact, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # the diagonal is always exact
        if self.feature_map is None:
            return safe_ratio(weights @ v, weights.sum(-1))
        share = torch.sigmoid(self.window_logit).view(-1, *[1] * (q.dim() - 2))  # per head, dim 1
        weights = share * weights
        if middle is not None:
            weights = weights + (1 - share) * (phi_q @ phi_k.transpose(-1, -2)) * middle
        num = weights @ v + (1 - share) * (phi_q @ linear.s)
        den = weights.sum(-1) + (1 - share[..., 0]) * (phi_q @ linear.n[..., None]).squeeze(-1)
        return safe_ratio(num, den)

    def _features(self, q, k, scaling):
        if self.feature_map is None:
            return None, None
        return self.feature_map.query(q, scaling)[0], self.feature_map.key(k, scaling)[0]

    def _empty_linear(self, like):
        batch, heads = like.shape[:2]
        return LinearState(like.new_zeros(batch, heads, self.feature_map.dim, like.shape[-1]),
                           like.new_zeros(batch, heads, self.feature_map.dim), like.new_full((batch, heads), float("-inf")))

    @staticmethod
    def _absorb(linear, phi_k, v, start, stop):
        """Add keys [start, stop) to the linear state."""
        if linear is None or stop <= start:
            return linear
        fk, vs = phi_k[:, :, start:stop], v[:, :, start:stop]
        return LinearState(linear.s + fk.transpose(-1, -2) @ vs, linear.n + fk.sum(dim=2), linear.ref)

    def _weights(self, q, k, scaling, rows):
        if self.feature_map is None:
            return hybrid_weights(q, k, scaling, rows, self.window, self.sinks)
        phi_q, phi_k = self.feature_map.query(q, scaling)[0], self.feature_map.key(k, scaling)[0]
        return hybrid_weights(q, k, scaling, rows, self.window, self.sinks, phi_q, phi_k, torch.sigmoid(self.window_logit))

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        return self._weights(q, k, scaling, rows)

    def quadratic(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        return (self._weights(q, k, scaling, torch.arange(q.shape[2], device=q.device)) @ v).to(dtype)

    def prefill(self, q, k, v, scaling):
        """All queries at once in blocks of `window`: block b attends exactly over the sinks and blocks b-1, b
        (masked), the rest of b-1's keys through phi (feature map set) and older keys through the linear
        state of the blocks before b-1 (an exclusive prefix sum). O(T (sinks + window)) time, groups of blocks
        bound the memory."""
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        length, window, device = q.shape[2], self.window, q.device
        n_blocks = -(-length // window)

        def blocks(x):  # (B, H, T, e) -> (B, H, n_blocks, window, e), zero padded at the end
            return F.pad(x, (0, 0, 0, n_blocks * window - length)).unflatten(2, (n_blocks, window))

        n_sinks = min(self.sinks, length)
        query_pos = torch.arange(n_blocks * window, device=device).view(n_blocks, window)
        local_pos = torch.cat([query_pos - window, query_pos], dim=1)  # negative: before the sequence
        offset = query_pos[:, :, None] - local_pos[:, None, :]
        visible = (offset >= 0) & (local_pos >= 0)[:, None, :]
        exact = visible & ((offset < window) | (local_pos < self.sinks)[:, None, :])
        # a sink key counts through the sink part only where the local part does not hold it
        sink_ok = (torch.arange(n_sinks, device=device)[None, :] < query_pos[:, :1] - window)[:, None, :].expand(-1, window, -1)
        exact = torch.cat([sink_ok, exact], dim=-1)
        phi_q, phi_k = self._features(q, k, scaling)
        qb, kb, vb = (blocks(x) for x in (q, k, v))
        middle = s = n = phi_qb = phi_kb = None
        if phi_q is not None:
            phi_qb, phi_kb = blocks(phi_q), blocks(phi_k)
            middle = torch.cat([torch.zeros_like(sink_ok), visible & ~exact[..., n_sinks:] & (local_pos >= self.sinks)[:, None, :]], dim=-1)
            # keys of the blocks before b-1, past the sinks: an exclusive prefix sum shifted by two blocks
            past_sinks = (torch.arange(length, device=device) >= self.sinks)[:, None]
            fk = blocks(phi_k * past_sinks)
            s = F.pad((fk.transpose(-1, -2) @ vb).cumsum(dim=2), (0, 0, 0, 0, 2, 0))[:, :, :n_blocks]
            n = F.pad(fk.sum(dim=3).cumsum(dim=2), (0, 0, 2, 0))[:, :, :n_blocks]
        budget = GROUP_SCORES_CUDA if q.is_cuda else GROUP_SCORES_CPU
        group = max(1, budget // (q.shape[0] * q.shape[1] * window * exact.shape[-1]))
        outputs = []
        for b0 in range(0, n_blocks, group):
            b1 = min(n_blocks, b0 + group)

            def keys(xb, raw, b0=b0, b1=b1):  # sinks, then each block beside the one before it: (B, H, b1 - b0, sinks + 2 window, e)
                before = xb[:, :, b0 - 1:b1 - 1] if b0 else F.pad(xb[:, :, :b1 - 1], (0, 0, 0, 0, 1, 0))
                return torch.cat([raw[:, :, None, :n_sinks].expand(-1, -1, b1 - b0, -1, -1), before, xb[:, :, b0:b1]], dim=3)

            phi = None if phi_q is None else (phi_qb[:, :, b0:b1], keys(phi_kb, phi_k), middle[b0:b1],
                                              LinearState(s[:, :, b0:b1], n[:, :, b0:b1], None))
            outputs.append(self._mix(qb[:, :, b0:b1], keys(kb, k), keys(vb, v), scaling, exact[b0:b1], *(phi or ())))
        z = torch.cat(outputs, dim=2).flatten(2, 3)[:, :, :length]
        first = max(0, length - window)
        state_linear = None if phi_k is None else self._absorb(self._empty_linear(q), phi_k, v, self.sinks, first)
        n_sinks = min(self.sinks, first)
        k, v = self.stored(k), self.stored(v)
        # the window as a ring buffer (position p in slot p % window) that decode steps overwrite in place
        window_k, window_v = (x[:, :, first:].roll(first % window, dims=2) for x in (k, v))
        state = HybridState(k[:, :, :n_sinks].clone(), v[:, :, :n_sinks].clone(), window_k, window_v, state_linear, length)
        return z.to(dtype), state

    def step(self, state, q, k, v, scaling):
        """One token: the window is a ring buffer (slot = position % window), full once the sequence has
        `window` tokens; the token it overwrites joins the sinks or the linear state."""
        position = state.length
        sink_k, sink_v, linear = state.sink_k, state.sink_v, state.linear
        window_k, window_v = state.window_k, state.window_v
        k, v = self.stored(k), self.stored(v)
        if window_k.shape[2] < self.window:
            window_k, window_v = torch.cat([window_k, k], dim=2), torch.cat([window_v, v], dim=2)
        else:
            slot = position % self.window
            old_k, old_v = window_k[:, :, slot:slot + 1].clone(), window_v[:, :, slot:slot + 1].clone()
            if position - self.window < self.sinks:
                sink_k, sink_v = torch.cat([sink_k, old_k], dim=2), torch.cat([sink_v, old_v], dim=2)
            elif linear is not None:
                linear = self._absorb(linear, self.feature_map.key(self.per_head(old_k), scaling)[0], self.per_head(old_v), 0, 1)
            window_k[:, :, slot:slot + 1], window_v[:, :, slot:slot + 1] = k, v
        keys, values = (self.per_head(torch.cat(x, dim=2)) for x in ((sink_k, window_k), (sink_v, window_v)))
        phi_q = None if self.feature_map is None else self.feature_map.query(q, scaling)[0]
        z = self._mix(q, keys, values, scaling, None, phi_q, None, None, linear)  # every key held is exact
        return z, HybridState(sink_k, sink_v, window_k, window_v, linear, position + 1)
