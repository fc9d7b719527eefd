"""The kernel interface, and exact causal softmax: the teacher every replacement is measured against.

A kernel maps one layer's q, k, v (B, H, T, d), after RoPE and after repeating k/v for GQA, to the
heads' outputs z (B, H, T, d). Every kernel offers three forms that tests hold equal:

    quadratic(q, k, v, scaling)                 the T x T reference (small T only)
    prefill(q, k, v, scaling) -> (z, state)     chunked over the sequence; `forward` returns its z
    decode(state, q, k, v, scaling)             token by token from the state (generation)

Learnable parameters are per head, shaped (H, ...). Any float input is computed in fp32 and the
output comes back in the input's dtype; states stay fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CHUNK = 64
TINY = torch.finfo(torch.float32).tiny


def as_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with den (.., T) >= 0; a zero den means every weight was 0, so num is 0 and z is 0."""
    return num / den.clamp_min(TINY).unsqueeze(-1)


def causal_mask(n_queries: int, n_keys: int, device) -> torch.Tensor:
    """True where query i (the last n_queries of n_keys positions) may see key j."""
    rows = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= rows[:, None]


class Kernel(nn.Module):
    """Base of all kernels; subclasses give `quadratic`, `prefill` and `step` (one decode token)."""

    name = "kernel"

    def __init__(self, n_heads: int, head_dim: int, chunk: int = CHUNK) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.chunk = n_heads, head_dim, chunk

    def options(self) -> dict:
        """Constructor options that rebuild this kernel (saved beside fitted parameters)."""
        return {}

    def forward(self, q, k, v, scaling: float) -> torch.Tensor:
        return self.prefill(q, k, v, scaling)[0]

    def quadratic(self, q, k, v, scaling: float) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, q, k, v, scaling: float):
        raise NotImplementedError

    def attention_weights(self, q, k, scaling: float, rows: torch.Tensor) -> torch.Tensor:
        """The effective attention of queries `q` (B, H, R, d) at absolute positions `rows` over keys
        k (B, H, S, d): (B, H, R, S), rows summing to 1. What a census sees of a replaced head."""
        raise NotImplementedError

    def step(self, state, q, k, v, scaling: float):
        """One token: q, k, v are (B, H, 1, d) in fp32; returns (z (B, H, 1, d), new state)."""
        raise NotImplementedError

    def decode(self, state, q, k, v, scaling: float):
        """Continue from `state` over the new tokens of q, k, v (B, H, n, d), one at a time."""
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        outputs = [q.new_zeros(*q.shape[:2], 0, v.shape[-1])]  # keeps the result defined for no new tokens
        for t in range(q.shape[2]):
            z, state = self.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], scaling)
            outputs.append(z)
        return torch.cat(outputs, dim=2).to(dtype), state


@dataclass
class KVState:
    k: torch.Tensor
    v: torch.Tensor


class SoftmaxKernel(Kernel):
    """Exact causal softmax; its state is the KV cache itself."""

    name = "softmax"

    def quadratic(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        scores = (q @ k.transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v).to(dtype)

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        scores = (q @ k.transpose(-1, -2)) * scaling
        visible = torch.arange(k.shape[2], device=q.device)[None, :] <= rows[:, None].to(q.device)
        return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)

    def prefill(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        outputs = []
        for start in range(0, q.shape[2], self.chunk):
            stop = min(q.shape[2], start + self.chunk)
            outputs.append(self.quadratic(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], scaling))
        return torch.cat(outputs, dim=2).to(dtype), KVState(k, v)

    def step(self, state, q, k, v, scaling):
        state = KVState(torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2))
        return self.quadratic(q, state.k, state.v, scaling), state
