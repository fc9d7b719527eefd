"""The delta rule: DeltaNet, Gated DeltaNet and Kimi Delta Attention (L2-normalised q, k; beta and the decay read off the keys)."""
from ..base import Family, check_options
from .kernel import DeltaKernel, l2_normalize

OPTIONS = {"deltanet": {"beta"}, "gated-deltanet": {"beta", "half_life"}, "kda": {"beta", "half_life"}}
GATES = {"deltanet": None, "gated-deltanet": "head", "kda": "channel"}


def build(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> DeltaKernel:
    check_options(name, options, OPTIONS[name])
    return DeltaKernel(n_heads, head_dim, name=name, gate=GATES[name], chunk=chunk, **options)


FAMILY = {
    "deltanet": Family(build, "linear", "DeltaNet: delta-rule state update, beta per token from the keys (options: beta)"),
    "gated-deltanet": Family(build, "linear", "Gated DeltaNet: the delta rule with a decay per token (options: beta, half_life)"),
    "kda": Family(build, "linear", "Kimi Delta Attention: the delta rule with a decay per channel and token (options: beta, half_life)"),
}
__all__ = ["DeltaKernel", "l2_normalize", "FAMILY"]
