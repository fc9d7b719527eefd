"""Linear attention with a feature map phi: a state of f x d_v numbers per head, whatever T is.

    quadratic   Z = normalize((phi(Q) phi(K)^T) * causal) V
    recurrent   S_t = S_{t-1} + phi(k_t) v_t^T,  n_t = n_{t-1} + phi(k_t),  z_t = S_t^T phi(q_t) / n_t^T phi(q_t)
    chunked     per chunk of C: the intra-chunk quadratic part + phi(Q_c) S_prev, then S += phi(K_c)^T V_c

Maps with a key log-scale (Performer) keep S and n relative to the running maximum `ref` of the
key log-scales, rescaling both when it grows; queries' own scale cancels in the ratio.
On CUDA, the prefill of the other maps runs the Triton chunked kernel (`triton_linear`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import CHUNK, Kernel, as_fp32, causal_mask, safe_ratio
from ..dispatch import use_triton
from .feature_maps import FeatureMap
from .naive import linear_attention, linear_weights


@dataclass
class LinearState:
    s: torch.Tensor  # (B, H, f, d_v)
    n: torch.Tensor  # (B, H, f)
    ref: torch.Tensor  # (B, H): S and n are stored divided by exp(ref)


def rescale_keys(state: LinearState, phi_k: torch.Tensor, log_k: torch.Tensor | None) -> tuple[LinearState, torch.Tensor]:
    """Bring state and new key features (B, H, n, f) to a common reference log-scale."""
    if log_k is None:
        return state, phi_k
    ref = torch.maximum(state.ref, log_k.amax(dim=-1))
    decay = torch.exp(state.ref - ref)
    state = LinearState(state.s * decay[..., None, None], state.n * decay[..., None], ref)
    return state, phi_k * torch.exp(log_k - ref[..., None])[..., None]


class LinearKernel(Kernel):
    def __init__(self, feature_map: FeatureMap, chunk: int = CHUNK) -> None:
        super().__init__(feature_map.n_heads, feature_map.head_dim, chunk)
        self.feature_map = feature_map
        self.name = feature_map.name

    def options(self):
        return {**self.feature_map.options(), "chunk": self.chunk}

    def state_numbers(self, d_v=None):
        return self.feature_map.dim * ((d_v or self.head_dim) + 1)  # S (f x d_v) and n (f)

    def empty_state(self, like: torch.Tensor, d_v: int) -> LinearState:
        batch, heads = like.shape[:2]
        f = self.feature_map.dim
        return LinearState(like.new_zeros(batch, heads, f, d_v), like.new_zeros(batch, heads, f),
                           like.new_full((batch, heads), float("-inf")))

    def quadratic(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        phi_q, _ = self.feature_map.query(q, scaling)
        phi_k, log_k = self.feature_map.key(k, scaling)
        _, phi_k = rescale_keys(self.empty_state(q, v.shape[-1]), phi_k, log_k)
        return linear_attention(phi_q, phi_k, v).to(dtype)

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        phi_q, _ = self.feature_map.query(q, scaling)
        phi_k, log_k = self.feature_map.key(k, scaling)
        _, phi_k = rescale_keys(self.empty_state(q, 1), phi_k, log_k)
        return linear_weights(phi_q, phi_k, rows)

    def prefill(self, q, k, v, scaling):
        dtype = q.dtype
        q, k, v = as_fp32(q, k, v)
        phi_q, _ = self.feature_map.query(q, scaling)
        phi_k, log_k = self.feature_map.key(k, scaling)
        state = self.empty_state(q, v.shape[-1])
        if self.fits_triton(q, v.shape[-1]):
            from ..triton_linear import chunked_linear_attention

            return chunked_linear_attention(phi_q, phi_k, v).to(dtype), self.state_from(phi_k, v)
        outputs = []
        for start in range(0, q.shape[2], self.chunk):
            part = slice(start, start + self.chunk)
            fq, fk, vc = phi_q[:, :, part], phi_k[:, :, part], v[:, :, part]
            state, fk = rescale_keys(state, fk, None if log_k is None else log_k[:, :, part])
            weights = (fq @ fk.transpose(-1, -2)) * causal_mask(fq.shape[2], fk.shape[2], q.device)
            num = weights @ vc + fq @ state.s
            den = weights.sum(-1) + (fq @ state.n[..., None]).squeeze(-1)
            outputs.append(safe_ratio(num, den))
            state = LinearState(state.s + fk.transpose(-1, -2) @ vc, state.n + fk.sum(dim=2), state.ref)
        return torch.cat(outputs, dim=2).to(dtype), state

    def fits_triton(self, x: torch.Tensor, d_v: int) -> bool:
        """Whether the Triton kernels can run this kernel on tensors like x: exact features, widths <= 256."""
        return not self.feature_map.log_scaled and use_triton(x) and max(self.feature_map.dim, d_v) <= 256

    def features(self, q, k, scaling):
        """phi(q), phi(k) in fp32, for a map without a log-scale."""
        q, k = as_fp32(q, k)
        return self.feature_map.query(q, scaling)[0], self.feature_map.key(k, scaling)[0]

    def state_from(self, phi_k, v) -> LinearState:
        """The recurrent state after keys with features phi_k (B,H,T,f) and values v (B,H,T,d_v)."""
        phi_k, v = as_fp32(phi_k, v)
        return LinearState(phi_k.transpose(-1, -2) @ v, phi_k.sum(dim=2), phi_k.new_full(phi_k.shape[:2], float("-inf")))

    def step(self, state, q, k, v, scaling):
        phi_q, _ = self.feature_map.query(q, scaling)
        phi_k, log_k = self.feature_map.key(k, scaling)
        state, phi_k = rescale_keys(state, phi_k, log_k)
        state = LinearState(state.s + phi_k.transpose(-1, -2) @ v, state.n + phi_k.sum(dim=2), state.ref)
        num = phi_q @ state.s
        den = (phi_q @ state.n[..., None]).squeeze(-1)
        return safe_ratio(num, den), state
