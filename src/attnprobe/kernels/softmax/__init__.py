"""Exact causal softmax (the teacher)."""
from ..base import Family, check_options
from .kernel import KVState, SoftmaxKernel


def build(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> SoftmaxKernel:
    check_options(name, options, set())
    return SoftmaxKernel(n_heads, head_dim, chunk)


FAMILY = {"softmax": Family(build, "softmax", "exact causal softmax (the teacher; replacing a head with it changes nothing)")}
__all__ = ["KVState", "SoftmaxKernel", "FAMILY"]
