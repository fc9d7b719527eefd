"""Exact causal softmax: the teacher every replacement is measured against; its state is the KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Kernel, as_fp32
from .naive import softmax_attention, softmax_weights


@dataclass
class KVState:
    k: torch.Tensor
    v: torch.Tensor


class SoftmaxKernel(Kernel):
    name = "softmax"
    cached_tokens = None  # every token

    def quadratic(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        return softmax_attention(q, k, v, scaling).to(dtype)

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        return softmax_weights(q, k, scaling, rows)

    def prefill(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        outputs = []
        for start in range(0, q.shape[2], self.chunk):
            stop = min(q.shape[2], start + self.chunk)
            outputs.append(softmax_attention(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], scaling))
        return torch.cat(outputs, dim=2).to(dtype), KVState(self.stored(k), self.stored(v))

    def step(self, state, q, k, v, scaling):
        state = KVState(torch.cat([state.k, self.stored(k)], dim=2), torch.cat([state.v, self.stored(v)], dim=2))
        return softmax_attention(q, self.per_head(state.k), self.per_head(state.v), scaling), state
