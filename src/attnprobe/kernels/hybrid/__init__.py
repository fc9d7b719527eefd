"""Token hybrids: exact softmax over sink and window tokens, optionally a linear term for the rest."""
from attnprobe.errors import AttnprobeError

from ..base import Family, check_options, constructor_options
from ..linear import FEATURE_MAPS
from .kernel import HybridKernel, HybridState
from .mix import MixKernel

DEFAULTS = {  # name -> (window, sinks, default feature map)
    "window+linear": (64, 0, "hedgehog"),
    "sink+window": (64, 4, None),
    "sink+window+linear": (64, 4, "hedgehog"),
}
SUMMARIES = {
    "window+linear": "LoLCATs: softmax on the last `window` tokens + linear for older ones, one denominator",
    "sink+window": "StreamingLLM: softmax on the first `sinks` and the last `window` tokens, nothing else",
    "sink+window+linear": "the above plus a linear term for the evicted middle",
}


def build(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> HybridKernel:
    window, sinks, map_name = DEFAULTS[name]
    map_name = options.pop("feature_map", map_name) if map_name else None
    if map_name is not None and map_name not in FEATURE_MAPS:
        raise AttnprobeError(f"unknown feature map '{map_name}' for {name}: choose one of {', '.join(FEATURE_MAPS)}")
    own = {"window", "sinks", "window_weight"} if map_name else {"window", "sinks"}
    map_allowed = constructor_options(FEATURE_MAPS[map_name]) if map_name else set()
    check_options(name, options, own | map_allowed)
    feature_map = FEATURE_MAPS[map_name](n_heads, head_dim, **{k: options[k] for k in map_allowed & set(options)}) if map_name else None
    hybrid = {"window": window, "sinks": sinks, **{k: options[k] for k in own & set(options)}}
    return HybridKernel(n_heads, head_dim, name, feature_map=feature_map, chunk=chunk, **hybrid)


def build_mix(name: str, n_heads: int, head_dim: int, chunk: int, **options) -> MixKernel:
    """sink+window+gdn: sink+window softmax mixed with Gated DeltaNet (options: window, sinks, beta, half_life, exact_weight)."""
    from ..deltanet import DeltaKernel

    check_options(name, options, {"window", "sinks", "beta", "half_life", "exact_weight"})
    window, sinks, _ = DEFAULTS["sink+window"]
    exact = HybridKernel(n_heads, head_dim, "sink+window", window=options.get("window", window),
                         sinks=options.get("sinks", sinks), chunk=chunk)
    recurrent = DeltaKernel(n_heads, head_dim, "gated-deltanet", gate="head", chunk=chunk,
                            **{k: options[k] for k in ("beta", "half_life") if k in options})
    return MixKernel(name, exact, recurrent, options.get("exact_weight", 0.5))


FAMILY = {name: Family(build, "hybrid", SUMMARIES[name]) for name in DEFAULTS}
FAMILY["sink+window+gdn"] = Family(build_mix, "hybrid", "Liger-style: f * sink+window softmax + (1 - f) * Gated DeltaNet, f learnable per head")
__all__ = ["DEFAULTS", "HybridKernel", "HybridState", "MixKernel", "FAMILY"]
