"""Gated linear attention (GLA): per-channel data-dependent decay of a linear-attention state."""
from ..base import Family, check_options, constructor_options
from .kernel import GatedKernel, GLAKernel


def build(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> GLAKernel:
    check_options(name, options, constructor_options(GLAKernel) - {"chunk"})
    return GLAKernel(n_heads, head_dim, chunk=chunk, **options)


FAMILY = {"gla": Family(build, "linear", "gated linear attention, per-channel decay from the keys (Liger init; options: gate, gate_rank, feature_map, normalize)")}
__all__ = ["GatedKernel", "GLAKernel", "FAMILY"]
