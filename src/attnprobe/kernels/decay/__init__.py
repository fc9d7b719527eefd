"""Scalar decay per head (RetNet / Lightning / Mamba-2 style), fixed or data-dependent."""
from ..base import Family, check_options, constructor_options
from .kernel import DecayKernel, half_life_for_distance, retnet_half_lives


def build(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> DecayKernel:
    check_options(name, options, constructor_options(DecayKernel) - {"chunk"})
    return DecayKernel(n_heads, head_dim, chunk=chunk, **options)


FAMILY = {"decay": Family(build, "linear", "linear attention with a scalar decay per head (RetNet init; options: half_life, data_dependent, feature_map, normalize)")}
__all__ = ["DecayKernel", "half_life_for_distance", "retnet_half_lives", "FAMILY"]
