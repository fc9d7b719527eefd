"""The named architectures (`catalogue`) and the one resolver of what the swap and convert commands replace:
named variants, or one kernel on chosen heads. Importable without torch, so the help and the option checks
name every variant and kernel before anything heavy is imported or loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.names import KERNELS, names

if TYPE_CHECKING:
    import pandas as pd

    from attnprobe.hooks.model import Model

Head = tuple[int, int]


@dataclass
class Variant:
    name: str
    kernel: str | None  # None: the original model
    keep: Callable[[Model, pd.DataFrame | None], set[Head]]  # heads that stay softmax
    description: str


def _none(model, heads):
    return set()


def _every_nth_layer(n: int):
    def keep(model, heads):
        return {(layer, h) for layer in range(model.info.n_layers) if layer % n == n - 1 for h in range(model.info.n_heads)}
    return keep


def _by_role(role: str):
    def keep(model, heads):
        if heads is None or "roles" not in heads:
            raise AttnprobeError(f"this variant keeps the census's {role} heads: pass --from a census run directory")
        chosen = heads[heads["roles"].fillna("").str.split(",").map(lambda roles: role in roles)]
        return {(int(r.layer), int(r.head)) for r in chosen.itertuples()}
    return keep


def _full_layers(model, heads):
    return {(layer, h) for layer, kind in enumerate(model.info.layer_types) if kind == "full" for h in range(model.info.n_heads)}


def every_variant(sliding: bool = True) -> list[Variant]:
    """Every named architecture (those that replace a native sliding layer only with `sliding`)."""
    variants = [Variant("original", None, _none, "the pretrained softmax model")]
    for kernel in names("linear"):
        variants.append(Variant(f"all-{kernel}", kernel, _none, f"every head {kernel} linear attention"))
    for n in (2, 4, 6):
        variants.append(Variant(f"layers-1of{n}-softmax", "hedgehog", _every_nth_layer(n),
                                f"1 of every {n} layers softmax, the rest hedgehog"))
    variants.append(Variant("layers-1of4-softmax-gdn", "gated-deltanet", _every_nth_layer(4),
                            "1 of every 4 layers softmax, the rest Gated DeltaNet"))
    variants.append(Variant("keep-retrieval-heads", "hedgehog", _by_role("retrieval"),
                            "census retrieval heads (by the census's threshold) softmax, the rest hedgehog"))
    variants.append(Variant("keep-sink-heads", "hedgehog", _by_role("sink"),
                            "census sink heads (alpha_1 above the census's eps) softmax, the rest hedgehog"))
    for kernel in names("hybrid"):
        variants.append(Variant(kernel, kernel, _none, f"every head {kernel}"))
    if sliding:
        variants.append(Variant("linear-sliding-layers", "hedgehog", _full_layers,
                                "the native sliding-window layers hedgehog, the full layers softmax"))
    return variants


def catalogue(model: Model) -> dict[str, Variant]:
    """Every named architecture that makes sense for `model`."""
    return {v.name: v for v in every_variant("sliding" in model.info.layer_types)}


VARIANT_NAMES = tuple(v.name for v in every_variant())


def check_kernel(kernel: str | None) -> None:
    if kernel not in KERNELS:
        raise AttnprobeError(f"unknown kernel '{kernel}': choose one of {', '.join(KERNELS)}")


def requested(text: str | None) -> list[str]:
    """The variant names in comma-separated `text`, refused (before any model loads) when one is no variant's."""
    wanted = [v.strip() for v in (text or "").split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANT_NAMES]
    if unknown or (text is not None and not wanted):
        raise AttnprobeError(f"unknown variant(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(VARIANT_NAMES)}")
    return wanted


def resolve(model: Model, names_text: str | None, kernel: str | None, heads: str | None, layers: str | None,
            from_run: Path | None, prefix: str, seed: int = 0) -> list[Variant]:
    """What a swap or a conversion replaces: the variants named in `names_text` (as the model has them), then, with
    a kernel, one variant PREFIX-KERNEL replacing --heads / --layers (every layer when neither is given)."""
    from attnprobe.analyses.experiments.selection import parse_heads

    available = catalogue(model)
    missing = [name for name in requested(names_text) if name not in available]
    if missing:
        raise AttnprobeError(f"variant(s) {', '.join(missing)} need a model with sliding-window layers: "
                             f"choose from {', '.join(available)}")
    chosen = [available[name] for name in requested(names_text)]
    if kernel is not None or heads or layers:
        check_kernel(kernel)
        info = model.info
        replaced = set(parse_heads(heads, info, from_run, seed, None, layers or (None if heads else f"0-{info.n_layers - 1}")))
        keep = {(layer, h) for layer in range(info.n_layers) for h in range(info.n_heads)} - replaced
        chosen.append(Variant(f"{prefix}-{kernel}", kernel, lambda m, t: keep, f"{len(replaced)} heads {kernel}"))
    return chosen
