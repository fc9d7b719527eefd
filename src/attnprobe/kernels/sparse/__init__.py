"""Sparse attention: exact softmax over the keys each query keeps (oracle top-k, Quest, MInference's
vertical-slash, PowerAttention); references in naive.py."""
from ..base import Family, check_options, constructor_options
from .kernel import (
    OracleTopK,
    PowerAttention,
    Quest,
    SparseKernel,
    SparseState,
    VerticalSlash,
)

RULES = {cls.name: cls for cls in (OracleTopK, Quest, VerticalSlash, PowerAttention)}
SUMMARIES = {
    "oracle-topk": "each query's top-k keys by exact score plus sinks: the upper bound of any sparse selector",
    "quest": "Quest: decode steps keep the top pages by a per-page min/max bound of q . k (prefill dense)",
    "vertical-slash": "MInference: prefill keeps the columns and diagonals the last queries attend most (decode dense)",
    "power": "PowerAttention: static blocks at distance 0 and 2^k, plus sinks and a local window",
}


def build(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> SparseKernel:
    cls = RULES[name]
    check_options(name, options, constructor_options(cls) - {"chunk"})
    return cls(n_heads, head_dim, chunk=chunk, **options)


FAMILY = {name: Family(build, "sparse", SUMMARIES[name]) for name in RULES}
__all__ = ["FAMILY", "RULES", "SparseKernel", "SparseState"]
