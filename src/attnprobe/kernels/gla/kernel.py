"""Gated linear attention kernels on one head's q, k, v (after RoPE): the shared machinery of the
per-channel (`gla`) and scalar (`decay`) families, and `gla` itself.

Gates are computed from the head's own key k_t, never from q: the state then depends on (k, v) alone,
as it must for a replaced head whose state is rebuilt from the KV cache, and the effective attention
A depends on (q, k) alone. The kernel sees k after RoPE, so a gate read off k varies with position
through RoPE's rotation; the fitted gate parameters absorb what they can of it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from attnprobe.errors import AttnprobeError

from ..base import CHUNK, Kernel, as_fp32, safe_ratio
from ..dispatch import use_fla
from . import chunk as forms

GATE_NORMALIZER = 16.0  # GLA's gate_logit_normalizer: log alpha = logsigmoid(logit) / 16 keeps alpha near 1
FEATURE_MAPS = ("softmax", "identity")


class GatedKernel(Kernel):
    """Linear attention whose state decays by gates alpha_t read off k_t; subclasses give `log_gates`.

    feature_map "softmax": phi(x) = softmax(x) over the head dimension (Liger), "identity": q scaled
    by `scaling` and k as they are (then `normalize` must be off: the row sums may be 0 or negative).
    """

    fla_op = None  # the flash-linear-attention op of the family (set by subclasses)
    quadratic_trains = False  # the blocked quadratic form keeps a (rows x 16 x d) decay tensor per block: train chunked

    def __init__(self, n_heads: int, head_dim: int, feature_map: str = "softmax", normalize: bool = True,
                 chunk: int = CHUNK) -> None:
        super().__init__(n_heads, head_dim, chunk)
        if feature_map not in FEATURE_MAPS:
            raise AttnprobeError(f"unknown feature map '{feature_map}' for {self.name}: choose one of {', '.join(FEATURE_MAPS)}")
        if feature_map == "identity" and normalize:
            raise AttnprobeError(f"{self.name} with feature_map='identity' needs normalize=False (its row sums can be 0 or negative)")
        self.feature_map, self.normalize = feature_map, normalize

    @property
    def normalized(self) -> bool:
        return self.normalize

    def options(self) -> dict:
        return {"feature_map": self.feature_map, "normalize": self.normalize, "chunk": self.chunk}

    def state_numbers(self, d_v=None):
        return self.head_dim * ((d_v or self.head_dim) + int(self.normalize))  # S (d x d_v) and n (d)

    def log_gates(self, k: torch.Tensor) -> torch.Tensor:
        """log alpha_t (B, H, T, d) or (B, H, T, 1) from the keys (B, H, T, d), all <= 0."""
        raise NotImplementedError

    def features(self, q, k, scaling):
        if self.feature_map == "softmax":
            return torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)
        return q * scaling, k

    def _inputs(self, q, k, v, scaling):
        q, k, v = as_fp32(q, k, v)
        phi_q, phi_k = self.features(q, k, scaling)
        values = forms.with_ones(v) if self.normalize else v
        return phi_q, phi_k, values, self.log_gates(k)  # (B, H, T, d) per channel, (B, H, T, 1) scalar

    def _output(self, o):
        return safe_ratio(o[..., :-1], o[..., -1]) if self.normalize else o

    def quadratic(self, q, k, v, scaling):
        phi_q, phi_k, values, log_alpha = self._inputs(q, k, v, scaling)
        weights = forms.blocked_weights(phi_q, phi_k, log_alpha, torch.arange(q.shape[2], device=q.device))
        return self._output(weights @ values).to(q.dtype)

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        phi_q, phi_k = self.features(q, k, scaling)
        weights = forms.blocked_weights(phi_q, phi_k, self.log_gates(k), rows)
        return safe_ratio(weights, weights.sum(-1)) if self.normalize else weights

    def fla_prefills(self, x):
        return self.fla_op is not None and use_fla(x)

    def prefill(self, q, k, v, scaling):
        phi_q, phi_k, values, log_alpha = self._inputs(q, k, v, scaling)
        if self.fla_prefills(q):
            from ..fla import prefill as fla_prefill

            o, state = fla_prefill(self.fla_op, phi_q, phi_k, values, log_alpha, q.dtype)
        elif log_alpha.shape[-1] == 1:  # one gate per head (decay): every chunk at once
            o, state = forms.scalar_chunked(phi_q, phi_k, values, log_alpha, self.chunk)
        else:
            o, state = forms.chunked(phi_q, phi_k, values, log_alpha, None, self.chunk)
        return self._output(o).to(q.dtype), state

    def step(self, state, q, k, v, scaling):
        phi_q, phi_k, values, log_alpha = self._inputs(q, k, v, scaling)
        o, state = forms.step(phi_q, phi_k, values, log_alpha, state)
        return self._output(o), state


class GLAKernel(GatedKernel):
    """Per-channel gates. gate "key" (Liger: no new projection; pooling the key projection to the head
    dimension leaves the key itself): log alpha = logsigmoid(w * k + b) / 16 with w = 1, b = 0 at init.
    gate "projection": a fresh low-rank projection of k, log alpha = logsigmoid(k W_down W_up + b) / 16,
    W_up = 0 at init (so training starts from the constant gate sigmoid(b)^(1/16))."""

    name = "gla"
    fla_op = "gla"

    def __init__(self, n_heads: int, head_dim: int, gate: str = "key", gate_rank: int = 16, feature_map: str = "softmax",
                 normalize: bool = True, chunk: int = CHUNK) -> None:
        super().__init__(n_heads, head_dim, feature_map, normalize, chunk)
        if gate not in ("key", "projection"):
            raise AttnprobeError(f"gla gate must be 'key' (from the pretrained keys) or 'projection' (a fresh one); got '{gate}'")
        self.gate, self.gate_rank = gate, gate_rank
        self.gate_bias = nn.Parameter(torch.zeros(n_heads, head_dim))
        if gate == "key":
            self.gate_weight = nn.Parameter(torch.ones(n_heads, head_dim))
        else:
            generator = torch.Generator().manual_seed(0)
            self.gate_down = nn.Parameter(torch.randn(n_heads, head_dim, gate_rank, generator=generator) / math.sqrt(head_dim))
            self.gate_up = nn.Parameter(torch.zeros(n_heads, gate_rank, head_dim))

    def options(self):
        return {**super().options(), "gate": self.gate, "gate_rank": self.gate_rank}

    def log_gates(self, k):
        if self.gate == "key":
            logit = k * self.gate_weight[:, None, :]
        else:
            logit = torch.einsum("bhtd,hdr,hre->bhte", k, self.gate_down, self.gate_up)
        return nn.functional.logsigmoid(logit + self.gate_bias[:, None, :]) / GATE_NORMALIZER
