"""DeltaNet, Gated DeltaNet and Kimi Delta Attention on one head's q, k, v (after RoPE): chunked prefill by the WY/UT
representation (one unit lower-triangular solve per chunk), recurrent decode, exact effective attention.

q and k are L2-normalised (the model's `scaling` is not used: a stored pair k, v is read back as
v when q = k). beta_t = sigmoid(c + w . k_t) and, for the gated rules, a_t = sigmoid(c_a + w_a . k_t)
(KDA: one such gate per channel, c_a (H, d) and w_a (H, d, d)),
with k_t the head's own raw key: the state depends on (k, v) alone, so it can be rebuilt from a KV
cache, and A on (q, k) alone. At init w = w_a = 0: beta = sigmoid(c) = `beta` (default 0.5) and a
decays with the per-head `half_life` (RetNet's schedule by default).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from attnprobe.errors import AttnprobeError

from ..base import CHUNK, Kernel, as_fp32
from ..decay.kernel import retnet_half_lives
from ..dispatch import use_fla
from ..base import allowed_keys
from ..gla.chunk import blocked_weights

EPS = 1e-6  # of the L2 normalisation, as fla's l2norm


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + EPS)


def decayed_products(a, b, log_alpha, rows: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """sum_c a_t[c] b_s[c] prod_{i = s+1..t} alpha_i[c] for queries at `rows` over keys s <= t (s < t when
    strict), 0 elsewhere: (B, H, R, S). log alpha is (B, H, S, 1) (one gate per head) or (B, H, S, d)."""
    rows = rows.to(a.device)
    mask = allowed_keys(rows, b.shape[2])
    if strict:
        mask &= rows[:, None] != torch.arange(b.shape[2], device=a.device)[None, :]
    if log_alpha.shape[-1] > 1:  # per channel (KDA): GLA's exact blocked products
        return blocked_weights(a, b, log_alpha, rows) * mask
    total = log_alpha[..., 0].cumsum(dim=-1)
    return (a @ b.transpose(-1, -2)) * torch.exp((total[:, :, rows, None] - total[:, :, None, :]).masked_fill(~mask, float("-inf")))


def wy_chunk(q, k, v, beta, log_alpha, state):
    """One chunk from `state` (B, H, d, d_v), log alpha (B, H, C, 1 or d): (o (B, H, C, d_v), new state)."""
    positions = torch.arange(k.shape[2], device=k.device)
    total = log_alpha.cumsum(dim=2)
    system = torch.eye(k.shape[2], dtype=k.dtype, device=k.device) + beta[..., :, None] * decayed_products(k, k, log_alpha, positions, strict=True)
    rhs = beta[..., None] * (v - (k * torch.exp(total)) @ state)
    u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    o = (q * torch.exp(total)) @ state + decayed_products(q, k, log_alpha, positions) @ u
    last = total[:, :, -1:]
    state = torch.exp(last).transpose(-1, -2) * state + (k * torch.exp(last - total)).transpose(-1, -2) @ u
    return o, state


def wy_chunked(q, k, v, beta, log_alpha, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`wy_chunk` over the whole sequence in chunks of `chunk`, from a zero state, with everything that does not
    depend on the state done for all chunks at once (the UT transform's triangular solves, the decayed q.k
    products); what remains per chunk is the state's own recurrence, four (chunk x d) products. Within a
    chunk u = (I + diag(b) L)^-1 diag(b) (v - (k e^G) S) = U0 - W S, as fla's chunked delta rule splits it."""
    from ..gla.chunk import _in_chunks

    batch, heads, length = q.shape[:3]
    qc, kc, vc, gc = (_in_chunks(x, chunk) for x in (q, k, v, log_alpha))
    bc = _in_chunks(beta[..., None], chunk)  # (B, H, N, C, 1)
    flat = [x.flatten(1, 2) for x in (qc, kc, gc)]  # chunks as heads: (B, H N, C, .)
    positions = torch.arange(chunk, device=q.device)
    lower = decayed_products(flat[1], flat[1], flat[2], positions, strict=True).unflatten(1, (heads, -1))
    within = decayed_products(flat[0], flat[1], flat[2], positions).unflatten(1, (heads, -1))
    system = torch.eye(chunk, dtype=q.dtype, device=q.device) + bc * lower
    total = gc.cumsum(dim=3)
    last = total[:, :, :, -1:]
    u0, w = torch.linalg.solve_triangular(system, torch.cat([bc * vc, bc * kc * torch.exp(total)], dim=-1), upper=False,
                                          unitriangular=True).split([v.shape[-1], k.shape[-1]], dim=-1)
    q_decayed, k_decayed = qc * torch.exp(total), kc * torch.exp(last - total)
    carry = torch.exp(last).transpose(-1, -2)  # (B, H, N, 1 or d, 1)
    state = q.new_zeros(batch, heads, q.shape[-1], v.shape[-1])
    outputs = []
    for n in range(qc.shape[2]):
        u = u0[:, :, n] - w[:, :, n] @ state
        outputs.append(q_decayed[:, :, n] @ state + within[:, :, n] @ u)
        state = carry[:, :, n] * state + k_decayed[:, :, n].transpose(-1, -2) @ u
    return torch.cat(outputs, dim=2)[:, :, :length], state


class DeltaKernel(Kernel):
    """gate None: DeltaNet; "head": Gated DeltaNet (one decay per head and token); "channel": Kimi Delta
    Attention (one decay per channel, S_t = (I - b_t k_t k_t^T) diag(a_t) S_{t-1} + b_t k_t v_t^T)."""

    delta_rule = True  # what kernels.fla asks instead of importing this class

    normalized = False

    def __init__(self, n_heads: int, head_dim: int, name: str = "deltanet", gate: str | None = None, beta: float = 0.5,
                 half_life: float | Sequence[float] | None = None, chunk: int = CHUNK) -> None:
        super().__init__(n_heads, head_dim, chunk)
        if not 0 < beta < 1:
            raise AttnprobeError(f"{name} needs 0 < beta < 1 (its initial write strength); got {beta}")
        self.name, self.gate = name, gate
        self.beta_weight = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.beta_bias = nn.Parameter(torch.full((n_heads,), math.log(beta / (1 - beta))))
        if gate is not None:
            lives = retnet_half_lives(n_heads) if half_life is None else half_life
            lives = [float(lives)] * n_heads if isinstance(lives, (int, float)) else [float(h) for h in lives]
            if len(lives) != n_heads or min(lives) <= 0:
                raise AttnprobeError(f"{name} half_life needs one positive number or one per head ({n_heads}); got {half_life}")
            logit = torch.logit(torch.tensor([0.5 ** (1 / h) for h in lives], dtype=torch.float64)).float()
            if gate == "channel":  # every channel starts with its head's decay
                self.gate_bias = nn.Parameter(logit[:, None].repeat(1, head_dim))
                self.gate_weight = nn.Parameter(torch.zeros(n_heads, head_dim, head_dim))
            else:
                self.gate_bias = nn.Parameter(logit)
                self.gate_weight = nn.Parameter(torch.zeros(n_heads, head_dim))
        elif half_life is not None:
            raise AttnprobeError(f"{name} has no decay: half_life is an option of gated-deltanet and kda")

    def options(self):
        return {"chunk": self.chunk}  # beta and half_life only initialise parameters, which carry them from then on

    def state_numbers(self, d_v=None):
        return self.head_dim * (d_v or self.head_dim)

    def coefficients(self, k):
        """beta_t (B, H, T) and log a_t (B, H, T, 1), or (B, H, T, d) per channel, from the raw keys."""
        beta = torch.sigmoid(torch.einsum("bhtd,hd->bht", k, self.beta_weight) + self.beta_bias[:, None])
        if self.gate is None:
            return beta, torch.zeros_like(beta)[..., None]
        if self.gate == "channel":
            logit = torch.einsum("bhtd,hde->bhte", k, self.gate_weight) + self.gate_bias[:, None, :]
        else:
            logit = (torch.einsum("bhtd,hd->bht", k, self.gate_weight) + self.gate_bias[:, None])[..., None]
        return beta, nn.functional.logsigmoid(logit)

    def _inputs(self, q, k, v):
        q, k, v = as_fp32(q, k, v)
        beta, log_alpha = self.coefficients(k)
        return l2_normalize(q), l2_normalize(k), v, beta, log_alpha

    def quadratic(self, q, k, v, scaling):
        qn, kn, v, beta, log_alpha = self._inputs(q, k, v)
        return wy_chunk(qn, kn, v, beta, log_alpha, qn.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1]))[0].to(q.dtype)

    def attention_weights(self, q, k, scaling, rows):
        q, k = as_fp32(q, k)
        beta, log_alpha = self.coefficients(k)
        qn, kn = l2_normalize(q), l2_normalize(k)
        keys = torch.arange(k.shape[2], device=q.device)
        system = torch.eye(k.shape[2], dtype=k.dtype, device=k.device) + beta[..., :, None] * decayed_products(kn, kn, log_alpha, keys, strict=True)
        w = torch.linalg.solve_triangular(system, torch.diag_embed(beta), upper=False, unitriangular=True)
        return decayed_products(qn, kn, log_alpha, rows) @ w

    def fla_prefills(self, x):
        # fla's plain delta rule (chunk_delta_rule) refuses fp32 inputs: fp32 runs our chunked form
        return use_fla(x) and (self.gate is not None or x.dtype != torch.float32)

    def prefill(self, q, k, v, scaling):
        qn, kn, v, beta, log_alpha = self._inputs(q, k, v)
        if self.fla_prefills(q):
            from ..fla import delta_prefill

            o, state = delta_prefill(qn, kn, v, beta, log_alpha, self.gate, q.dtype)
            return o.to(q.dtype), state
        o, state = wy_chunked(qn, kn, v, beta, log_alpha, self.chunk)
        return o.to(q.dtype), state

    def step(self, state, q, k, v, scaling):
        qn, kn, v, beta, log_alpha = self._inputs(q, k, v)
        state = torch.exp(log_alpha[:, :, 0])[..., :, None] * state
        k_t = kn[:, :, 0]
        u = beta[:, :, 0, None] * (v[:, :, 0] - (k_t[..., :, None] * state).sum(-2))
        state = state + k_t[..., :, None] * u[..., None, :]
        return qn @ state, state
