"""Normalized linear attention with a feature map phi (elu, relu, Taylor, Performer, Hedgehog)."""
from ..base import Family, check_options, constructor_options
from .feature_maps import FEATURE_MAPS, FeatureMap
from .kernel import LinearKernel, LinearState, rescale_keys

SUMMARIES = {
    "elu": "normalized linear attention, phi(x) = elu(x) + 1 (Katharopoulos 2020)",
    "relu": "normalized linear attention, phi(x) = relu(x)",
    "taylor": "Based's 2nd-order Taylor map of exp (options: feature_dim, seed)",
    "performer": "FAVOR+ positive random features (options: n_features, seed)",
    "hedgehog": "Hedgehog: softmax([Wx, -Wx]), W learnable per head",
}


def build(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> LinearKernel:
    check_options(name, options, constructor_options(FEATURE_MAPS[name]))
    return LinearKernel(FEATURE_MAPS[name](n_heads, head_dim, **options), chunk)


FAMILY = {name: Family(build, "linear", SUMMARIES[name]) for name in FEATURE_MAPS}
__all__ = ["FEATURE_MAPS", "FeatureMap", "LinearKernel", "LinearState", "rescale_keys", "FAMILY"]
