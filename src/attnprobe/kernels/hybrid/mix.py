"""A sum of two kernels on the same head, Liger Attention's form (Lan et al. 2025, arXiv 2503.01496):

    z = f * z_exact + (1 - f) * z_recurrent,      A = f * A_exact + (1 - f) * A_recurrent,

with z_exact StreamingLLM's softmax over the sinks and the window, z_recurrent a fixed-state kernel
(Gated DeltaNet) over every token, and f = sigmoid(a) a learnable scalar per head (init 0.5, as
Liger's fixed 0.5 / 0.5). f is the exact share of the output (`exact_share`) and 1 - f the
recurrent share (`recurrent_share`): the weight of the Gated DeltaNet path, not a decay or a gate on
tokens. The state is the two kernels' states side by side.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import Kernel


class MixKernel(Kernel):
    normalized = False

    def __init__(self, name: str, exact: Kernel, recurrent: Kernel, exact_weight: float = 0.5) -> None:
        super().__init__(exact.n_heads, exact.head_dim, exact.chunk)
        self.name, self.exact, self.recurrent = name, exact, recurrent
        self.mix_logit = nn.Parameter(torch.full((exact.n_heads,), float(torch.logit(torch.tensor(exact_weight)))))

    @property
    def cached_tokens(self):
        return self.exact.cached_tokens

    def share_kv(self, kv_heads):
        super().share_kv(kv_heads)
        self.exact.share_kv(kv_heads)
        self.recurrent.share_kv(kv_heads)

    def state_numbers(self, d_v=None):
        return self.exact.state_numbers(d_v) + self.recurrent.state_numbers(d_v)

    def options(self):
        return {**self.exact.options(), **self.recurrent.options()}

    @property
    def exact_share(self) -> torch.Tensor:
        """f per head (H,): the weight of the sink + window softmax output."""
        return torch.sigmoid(self.mix_logit)

    @property
    def recurrent_share(self) -> torch.Tensor:
        """1 - f per head (H,): the weight of the recurrent (Gated DeltaNet) output."""
        return 1 - self.exact_share

    def _mix(self, exact, recurrent):
        exact_share = self.exact_share[None, :, None, None]
        recurrent_share = 1 - exact_share
        return (exact_share * exact.float() + recurrent_share * recurrent.float()).to(exact.dtype)

    def quadratic(self, q, k, v, scaling):
        return self._mix(self.exact.quadratic(q, k, v, scaling), self.recurrent.quadratic(q, k, v, scaling))

    def train_forward(self, q, k, v, scaling):
        # each part in the form that trains best for it (the window blocked, the delta rule through fla where allowed)
        return self._mix(self.exact.train_forward(q, k, v, scaling), self.recurrent.train_forward(q, k, v, scaling))

    def attention_weights(self, q, k, scaling, rows):
        return self._mix(self.exact.attention_weights(q, k, scaling, rows), self.recurrent.attention_weights(q, k, scaling, rows))

    def prefill(self, q, k, v, scaling):
        (z1, s1), (z2, s2) = self.exact.prefill(q, k, v, scaling), self.recurrent.prefill(q, k, v, scaling)
        return self._mix(z1, z2), (s1, s2)

    def step(self, state, q, k, v, scaling):
        (z1, s1), (z2, s2) = self.exact.step(state[0], q, k, v, scaling), self.recurrent.step(state[1], q, k, v, scaling)
        return self._mix(z1, z2), (s1, s2)
