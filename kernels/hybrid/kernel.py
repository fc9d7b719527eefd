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
from dataclasses import dataclass

import torch
from torch import nn

from attnprobe.hooks.errors import AttnprobeError

from ..base import CHUNK, Kernel, as_fp32, safe_ratio
from ..linear import FeatureMap, LinearState
from ..linear.feature_maps import PerformerMap
from .naive import hybrid_weights


@dataclass
class HybridState:
    sink_k: torch.Tensor  # (B, H, <= sinks, d): keys at positions 0..
    sink_v: torch.Tensor
    window_k: torch.Tensor  # (B, H, <= window, d): keys at the last positions
    window_v: torch.Tensor
    linear: LinearState | None  # keys evicted from the window, past the sinks
    length: int


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

    def _attend(self, q, k, v, q_pos, k_pos, scaling, phi_q=None, phi_k=None, linear=None):
        """z for queries at q_pos over keys at k_pos (plus the linear state of older keys)."""
        offset = q_pos[:, None] - k_pos[None, :]
        visible = offset >= 0
        exact = visible & ((offset < self.window) | (k_pos < self.sinks)[None, :])
        scores = ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~exact, float("-inf"))
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # the diagonal is always exact
        if self.feature_map is None:
            return safe_ratio(weights @ v, weights.sum(-1))
        share = torch.sigmoid(self.window_logit)[None, :, None, None]
        weights = share * weights
        if phi_k is not None:
            middle = visible & ~exact & (k_pos >= self.sinks)[None, :]
            weights = weights + (1 - share) * (phi_q @ phi_k.transpose(-1, -2)) * middle
        num = weights @ v + (1 - share) * (phi_q @ linear.s)
        den = weights.sum(-1) + (1 - share[..., 0]) * (phi_q @ linear.n[..., None]).squeeze(-1)
        return safe_ratio(num, den)

    def _features(self, q, k, scaling):
        if self.feature_map is None:
            return None, None, None
        batch, heads = q.shape[:2]
        f = self.feature_map.dim
        linear = LinearState(q.new_zeros(batch, heads, f, q.shape[-1]), q.new_zeros(batch, heads, f),
                             q.new_full((batch, heads), float("-inf")))
        return self.feature_map(q, scaling)[0], self.feature_map(k, scaling)[0], linear

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
        phi_q, phi_k = self.feature_map(q, scaling)[0], self.feature_map(k, scaling)[0]
        return hybrid_weights(q, k, scaling, rows, self.window, self.sinks, phi_q, phi_k, torch.sigmoid(self.window_logit))

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        return self._weights(q, k, scaling, rows)

    def quadratic(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        return (self._weights(q, k, scaling, torch.arange(q.shape[2], device=q.device)) @ v).to(dtype)

    def prefill(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        length = q.shape[2]
        phi_q, phi_k, linear = self._features(q, k, scaling)
        positions = torch.arange(length, device=q.device)
        covered = self.sinks  # the linear state holds keys [sinks, covered)
        outputs = []
        for start in range(0, length, self.chunk):
            stop = min(length, start + self.chunk)
            first = max(0, start - self.window)  # older keys are sinks or linear for every query here
            linear = self._absorb(linear, phi_k, v, covered, first)
            covered = max(covered, first)
            keys = torch.cat([positions[:min(self.sinks, first)], positions[first:stop]])
            outputs.append(self._attend(q[:, :, start:stop], k[:, :, keys], v[:, :, keys], positions[start:stop], keys,
                                        scaling, None if phi_q is None else phi_q[:, :, start:stop],
                                        None if phi_k is None else phi_k[:, :, keys], linear))
        first = max(0, length - self.window)
        linear = self._absorb(linear, phi_k, v, covered, first)
        sinks = min(self.sinks, first)
        state = HybridState(k[:, :, :sinks], v[:, :, :sinks], k[:, :, first:], v[:, :, first:], linear, length)
        return torch.cat(outputs, dim=2).to(dtype), state

    def step(self, state, q, k, v, scaling):
        position = state.length
        sink_k, sink_v, linear = state.sink_k, state.sink_v, state.linear
        window_k, window_v = torch.cat([state.window_k, k], dim=2), torch.cat([state.window_v, v], dim=2)
        if window_k.shape[2] > self.window:
            old_k, old_v = window_k[:, :, :1], window_v[:, :, :1]
            window_k, window_v = window_k[:, :, 1:], window_v[:, :, 1:]
            if position - self.window < self.sinks:
                sink_k, sink_v = torch.cat([sink_k, old_k], dim=2), torch.cat([sink_v, old_v], dim=2)
            elif linear is not None:
                linear = self._absorb(linear, self.feature_map(old_k, scaling)[0], old_v, 0, 1)
        keys, values = torch.cat([sink_k, window_k], dim=2), torch.cat([sink_v, window_v], dim=2)
        k_pos = torch.cat([torch.arange(sink_k.shape[2]), torch.arange(position + 1 - window_k.shape[2], position + 1)]).to(q.device)
        phi_q = None if self.feature_map is None else self.feature_map(q, scaling)[0]
        z = self._attend(q, keys, values, torch.tensor([position], device=q.device), k_pos, scaling, phi_q, None, linear)
        return z, HybridState(sink_k, sink_v, window_k, window_v, linear, position + 1)
