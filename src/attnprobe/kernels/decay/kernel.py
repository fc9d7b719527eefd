"""Scalar decay per head (RetNet / Lightning / Mamba-2 style), fixed or read off the keys.

gamma_t = sigmoid(c + w . k_t) with c a learnable logit per head (init from a half-life) and, when
`data_dependent`, w per head (init 0, so training starts from the fixed decay). A weight that decays
by gamma per token halves every h = ln 2 / -ln gamma tokens: the first token's weight falls as
gamma^t, so a sink head loses its sink and a retrieval head its needle beyond a few half-lives.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from attnprobe.errors import AttnprobeError

from ..base import CHUNK
from ..gla.kernel import GatedKernel


def retnet_half_lives(n_heads: int) -> list[float]:
    """RetNet's multi-scale decays gamma_h = 1 - 2^(-5-h), as half-lives in tokens."""
    return [math.log(2) / -math.log1p(-2.0 ** (-5 - h)) for h in range(n_heads)]


def half_life_for_distance(mean_distance: Sequence[float] | torch.Tensor) -> list[float]:
    """Per-head half-lives from per-head mean attention distances (the census's mean of t - s under A).

    Weights decaying as gamma^(t-s) over a long context have mean distance D = gamma / (1 - gamma),
    so gamma = D / (1 + D) and the half-life is ln 2 / -ln gamma."""
    distance = torch.as_tensor(mean_distance, dtype=torch.float64).clamp_min(1e-3)
    gamma = distance / (1 + distance)
    return (math.log(2) / -torch.log(gamma)).tolist()


class DecayKernel(GatedKernel):
    name = "decay"
    fla_op = "simple_gla"

    def __init__(self, n_heads: int, head_dim: int, half_life: float | Sequence[float] | None = None,
                 data_dependent: bool = False, feature_map: str = "softmax", normalize: bool = True,
                 chunk: int = CHUNK) -> None:
        super().__init__(n_heads, head_dim, feature_map, normalize, chunk)
        lives = retnet_half_lives(n_heads) if half_life is None else half_life
        lives = [float(lives)] * n_heads if isinstance(lives, (int, float)) else [float(h) for h in lives]
        if len(lives) != n_heads or min(lives) <= 0:
            raise AttnprobeError(f"decay half_life needs one positive number or one per head ({n_heads}); got {half_life}")
        self.data_dependent = data_dependent
        gamma = torch.tensor([0.5 ** (1 / h) for h in lives], dtype=torch.float64)
        self.decay_logit = nn.Parameter(torch.logit(gamma).float())
        if data_dependent:
            self.decay_weight = nn.Parameter(torch.zeros(n_heads, head_dim))

    quadratic_trains = True  # one gate per head and token: its quadratic form is one T x T decay matrix

    def options(self):
        # half_life only initialises decay_logit, which carries the (fitted) decay from then on
        return {**super().options(), "data_dependent": self.data_dependent}

    def log_gates(self, k):
        logit = self.decay_logit[:, None].expand(*k.shape[1:3])
        if self.data_dependent:
            logit = logit + torch.einsum("bhtd,hd->bht", k, self.decay_weight)
        return nn.functional.logsigmoid(logit).expand(*k.shape[:3])[..., None]
