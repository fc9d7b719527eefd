"""The kernel interface every family implements, its one causal/window mask and its constants.

A kernel maps one layer's q, k, v (B, H, T, d), after RoPE and after repeating k/v for GQA, to the
heads' outputs z (B, H, T, d). Every kernel offers three forms that tests hold equal:

    quadratic(q, k, v, scaling)                 the T x T reference (small T only); differentiable
    prefill(q, k, v, scaling) -> (z, state)     chunked over the sequence; `forward` returns its z
    decode(state, q, k, v, scaling)             token by token from the state (generation)

and describes itself, so callers ask it instead of listing names:

    attention_weights(q, k, scaling, rows)      its exact effective attention A, z = A v
    learnable                                   whether it has parameters to fit (`parameters()` are exactly those)
    state_numbers(d_v)                          numbers of its fixed-size decode state per head
    cached_tokens                               KV tokens per KV head it keeps beside that state (None: all of them)
    normalized                                  whether rows of A sum to 1 (gated and delta-rule kernels: no)

Under GQA the edit tells a kernel which of its heads read one KV head (`share_kv`), so a kernel whose
decode state keeps tokens (softmax, sparse, a hybrid's sinks and window) stores each KV head's keys
and values once, as the model's own cache does; `stored` and `per_head` move between the two forms.
Learnable parameters are per head, shaped (H, ...). Any float input is computed in fp32 and the
output comes back in the input's dtype; states stay fp32. A family is one folder with a `naive.py`
reference written from its paper beside its fast forms, registered by one line in `registry.py`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from attnprobe.errors import AttnprobeError

from .dispatch import torch_forms

CHUNK = 64  # tokens per chunk of the chunked prefills (and of the Triton linear kernels)
QUADRATIC_UP_TO = 1024  # sequence length up to which training uses the quadratic form (one T x T product is fastest)
TINY = torch.finfo(torch.float32).tiny  # the floor of every normalizing denominator


def as_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with den (.., T) >= 0; a zero den means every weight was 0, so num is 0 and z is 0."""
    return num / den.clamp_min(TINY).unsqueeze(-1)


def allowed_keys(rows: torch.Tensor, n_keys: int, window: int | None = None) -> torch.Tensor:
    """(R, S) bool: which of the keys 0..S-1 each query position in `rows` may attend to (causal, within `window`)."""
    keys = torch.arange(n_keys, device=rows.device)
    allowed = keys[None, :] <= rows[:, None]
    if window is not None:
        allowed &= (rows[:, None] - keys[None, :]) < window
    return allowed


def causal_mask(n_queries: int, n_keys: int, device) -> torch.Tensor:
    """True where query i (the last n_queries of n_keys positions) may see key j."""
    return allowed_keys(torch.arange(n_keys - n_queries, n_keys, device=device), n_keys)


@dataclass(frozen=True)
class Family:
    """One registered kernel name: how to build it and what it is (read by the catalogue and the CLI)."""

    build: Callable[..., "Kernel"]  # (name, n_heads, head_dim, chunk, **options) -> Kernel
    kind: str  # "softmax"; "linear": a fixed-size state only; "hybrid": some tokens stay exact softmax
    summary: str


def check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise AttnprobeError(f"kernel '{name}' has no option {', '.join(unknown)}: valid options are {', '.join(sorted(allowed)) or 'none'}")


def constructor_options(cls) -> set[str]:
    """The keyword options of a kernel or feature-map class (its __init__ minus n_heads and head_dim)."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "n_heads", "head_dim"}


class Kernel(nn.Module):
    """Base of all kernels; subclasses give `quadratic`, `prefill`, `step` and `attention_weights`."""

    name = "kernel"
    normalized = True
    cached_tokens: int | None = 0

    def __init__(self, n_heads: int, head_dim: int, chunk: int = CHUNK) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.chunk = n_heads, head_dim, chunk

    def options(self) -> dict:
        """Constructor options that rebuild this kernel (saved beside fitted parameters)."""
        return {}

    kv_heads: tuple[int, ...] | None = None  # the KV head each of this kernel's heads reads; None: one each

    def share_kv(self, kv_heads) -> None:
        """Heads i and j with kv_heads[i] == kv_heads[j] read one KV head (GQA): their k and v are equal, so
        the tokens a decode state keeps are stored once per KV head (`stored`, `per_head`)."""
        self.kv_heads = tuple(kv_heads)
        self._kv_index = {}

    def _kv_rows(self, which: str, device) -> torch.Tensor | None:
        """"first": the first head of each KV head; "of_head": each head's row among them; None when every
        head has its own KV head (nothing to share)."""
        kv = self.kv_heads
        if kv is None or len(set(kv)) == len(kv):
            return None
        key = (which, str(device))
        if key not in self._kv_index:
            distinct = list(dict.fromkeys(kv))
            rows = [kv.index(h) for h in distinct] if which == "first" else [distinct.index(h) for h in kv]
            self._kv_index[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._kv_index[key]

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, e) keys or values of this kernel's heads -> one row per KV head, as a state keeps them."""
        rows = self._kv_rows("first", x.device)
        return x if rows is None else x.index_select(1, rows)

    def per_head(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `stored`: (B, KV heads, T, e) -> (B, H, T, e), each head its KV head's row."""
        rows = self._kv_rows("of_head", x.device)
        return x if rows is None else x.index_select(1, rows)

    @property
    def learnable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def state_numbers(self, d_v: int | None = None) -> int:
        """Numbers in one head's fixed-size decode state (values of width d_v, default head_dim), cached tokens apart."""
        return 0

    def forward(self, q, k, v, scaling: float) -> torch.Tensor:
        return self.prefill(q, k, v, scaling)[0]

    def fla_prefills(self, x: torch.Tensor) -> bool:
        """Whether `prefill` runs a flash-linear-attention chunked op (which has a backward) on tensors like x."""
        return False

    quadratic_trains = True  # whether the quadratic form is the one to train at short lengths (memory permitting)

    def train_forward(self, q, k, v, scaling: float) -> torch.Tensor:
        """z of whole sequences, differentiable, in the form that trains best: fla's chunked op where prefill
        runs it and its backward agrees with ours on this device (`fla.trains`; O(T) memory), else the
        quadratic form up to QUADRATIC_UP_TO tokens (one T x T product is the fastest there), else the chunked
        torch prefill."""
        if self.fla_prefills(q):
            from . import fla

            if fla.trains(self, q):
                return self.forward(q, k, v, scaling)
        with torch_forms():
            if q.shape[2] <= QUADRATIC_UP_TO and self.quadratic_trains:
                return self.quadratic(q, k, v, scaling)
            return self.forward(q, k, v, scaling)

    def quadratic(self, q, k, v, scaling: float) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, q, k, v, scaling: float):
        raise NotImplementedError

    def attention_weights(self, q, k, scaling: float, rows: torch.Tensor) -> torch.Tensor:
        """The effective attention of queries `q` (B, H, R, d) at absolute positions `rows` over keys
        k (B, H, S, d): (B, H, R, S), with z = A v exactly (rows sum to 1 where `normalized`). What a
        census sees of a replaced head."""
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
