"""Feature maps phi for linear attention: phi(q) . phi(k) stands in for exp(scaling * q . k).

A map takes x (B, H, T, d) and returns (features (B, H, T, f), log_scale): the true features are
`features * exp(log_scale)[..., None]`, with log_scale (B, H, T) or None when the features are exact.
The split lets maps built from exp (Performer) stay finite for any input: the linear kernels keep a
running maximum of the key log-scales, as online softmax does. Parameters are per head, (H, ...).
Kernels map queries with `query` and keys with `key`: the same map for every map here except
Hedgehog, which learns one for each (as LoLCATs trains it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from attnprobe.errors import AttnprobeError


class FeatureMap(nn.Module):
    name = "map"
    log_scaled = False  # True when forward returns a log-scale (the Triton kernels take exact features only)

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim

    @property
    def dim(self) -> int:
        return self.head_dim

    def options(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def query(self, x: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of queries."""
        return self(x, scaling)

    def key(self, x: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of keys."""
        return self(x, scaling)


class EluMap(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020)."""

    name = "elu"

    def forward(self, x, scaling):
        return nn.functional.elu(x) + 1, None


class ReluMap(FeatureMap):
    """phi(x) = relu(x); a query orthogonal to every key gets a zero denominator."""

    name = "relu"

    def forward(self, x, scaling):
        return torch.relu(x), None


class TaylorMap(FeatureMap):
    """Based's 2nd-order Taylor map: phi(q) . phi(k) = 1 + s + s^2 / 2 with s = scaling * q . k.

    Features [1, x, x_i x_j / sqrt 2 (i = j), x_i x_j (i < j)] with x = sqrt(scaling) x; the upper
    triangle holds the d(d+1)/2 distinct products. `feature_dim` first projects x to d' dimensions
    (a learnable per-head matrix, random init preserving dot products in expectation), so the state
    shrinks from (1 + d + d(d+1)/2) x d to (1 + d' + d'(d'+1)/2) x d.
    """

    name = "taylor"

    def __init__(self, n_heads, head_dim, feature_dim: int | None = None, seed: int = 0):
        super().__init__(n_heads, head_dim)
        self.feature_dim, self.seed = feature_dim, seed
        if feature_dim is not None:
            generator = torch.Generator().manual_seed(seed)
            self.projection = nn.Parameter(torch.randn(n_heads, head_dim, feature_dim, generator=generator) / math.sqrt(feature_dim))
        width = feature_dim or head_dim
        rows, cols = torch.triu_indices(width, width)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("pair_weight", torch.where(rows == cols, 0.5 ** 0.5, 1.0), persistent=False)

    @property
    def dim(self) -> int:
        width = self.feature_dim or self.head_dim
        return 1 + width + width * (width + 1) // 2

    def options(self):
        return {"feature_dim": self.feature_dim, "seed": self.seed}

    def forward(self, x, scaling):
        if self.feature_dim is not None:
            x = torch.einsum("bhtd,hde->bhte", x, self.projection)
        x = x * scaling ** 0.5
        pairs = x[..., self.rows] * x[..., self.cols] * self.pair_weight
        return torch.cat([torch.ones_like(x[..., :1]), x, pairs], dim=-1), None


def orthogonal_gaussian(n_features: int, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(n_features, d) rows: orthogonal within blocks of d, with Gaussian-row lengths (FAVOR+)."""
    gaussian = torch.randn(math.ceil(n_features / head_dim), head_dim, head_dim, generator=generator)
    basis, upper = torch.linalg.qr(gaussian)
    basis = basis * torch.sign(torch.diagonal(upper, dim1=-2, dim2=-1))[:, None, :]  # uniform directions
    lengths = torch.randn(n_features, head_dim, generator=generator).norm(dim=1)
    return basis.transpose(-1, -2).reshape(-1, head_dim)[:n_features] * lengths[:, None]


class PerformerMap(FeatureMap):
    """FAVOR+ positive random features exp(w . x - |x|^2 / 2) / sqrt(m), x = sqrt(scaling) x.

    The draws are fixed by `seed` (one block-orthogonal matrix per head); m >= d features.
    """

    name = "performer"
    log_scaled = True

    def __init__(self, n_heads, head_dim, n_features: int | None = None, seed: int = 0):
        super().__init__(n_heads, head_dim)
        self.n_features, self.seed = n_features or head_dim, seed
        if self.n_features < head_dim:
            raise AttnprobeError(f"performer needs n_features >= head_dim ({head_dim}); got {self.n_features}")
        generator = torch.Generator().manual_seed(seed)
        draws = [orthogonal_gaussian(self.n_features, head_dim, generator).T for _ in range(n_heads)]
        self.register_buffer("projection", torch.stack(draws))  # (H, d, m)

    @property
    def dim(self) -> int:
        return self.n_features

    def options(self):
        return {"n_features": self.n_features, "seed": self.seed}

    def forward(self, x, scaling):
        x = x * scaling ** 0.5
        exponent = torch.einsum("bhtd,hdm->bhtm", x, self.projection) - 0.5 * (x * x).sum(-1, keepdim=True)
        top = exponent.amax(dim=-1, keepdim=True)
        return torch.exp(exponent - top), top.squeeze(-1) - 0.5 * math.log(self.n_features)


class HedgehogMap(FeatureMap):
    """Hedgehog (Zhang et al. 2024) as LoLCATs trains it: phi_q(x) = softmax([W_q x, -W_q x]) for queries and
    phi_k(x) = softmax([W_k x, -W_k x]) for keys, over the 2d channels, W_q and W_k per head, both initialised to I.

    A fit saved with the earlier single map (`weight`, shared by queries and keys) loads as W_q = W_k = weight,
    which is the same kernel."""

    name = "hedgehog"

    def __init__(self, n_heads, head_dim):
        super().__init__(n_heads, head_dim)
        self.query_weight = nn.Parameter(torch.eye(head_dim).repeat(n_heads, 1, 1))
        self.key_weight = nn.Parameter(torch.eye(head_dim).repeat(n_heads, 1, 1))

    @property
    def dim(self) -> int:
        return 2 * self.head_dim

    @staticmethod
    def _features(x, weight):
        y = torch.einsum("bhtd,hde->bhte", x, weight)
        return torch.softmax(torch.cat([y, -y], dim=-1), dim=-1), None

    def forward(self, x, scaling):
        raise AttnprobeError("hedgehog maps queries and keys differently: call its query() or key()")

    def query(self, x, scaling):
        return self._features(x, self.query_weight)

    def key(self, x, scaling):
        return self._features(x, self.key_weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        shared = state_dict.pop(prefix + "weight", None)
        if shared is not None:  # the earlier form: one map for queries and keys
            state_dict.setdefault(prefix + "query_weight", shared)
            state_dict.setdefault(prefix + "key_weight", shared.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


FEATURE_MAPS: dict[str, type[FeatureMap]] = {m.name: m for m in (EluMap, ReluMap, TaylorMap, PerformerMap, HedgehogMap)}
