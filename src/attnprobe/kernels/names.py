"""Every registered kernel's name and kind, importable without torch.

The CLI's help texts and option checks read these (`attnprobe --help` must answer at once, and the family
modules import torch). `registry.FAMILIES` is the truth; tests/test_kernel_registry.py holds this table
equal to it, so a family registered there without its names here fails that test.
"""
from __future__ import annotations

KINDS: dict[str, str] = {
    "softmax": "softmax",
    **dict.fromkeys(("elu", "relu", "taylor", "performer", "hedgehog", "gla", "decay", "deltanet", "gated-deltanet", "kda"),
                    "linear"),
    **dict.fromkeys(("window+linear", "sink+window", "sink+window+linear", "sink+window+gdn"), "hybrid"),
    **dict.fromkeys(("oracle-topk", "quest", "vertical-slash", "power"), "sparse"),
}
KERNELS = tuple(KINDS)


def names(kind: str) -> list[str]:
    """The registered kernel names of one kind ("softmax", "linear", "hybrid", "sparse")."""
    return [name for name, family_kind in KINDS.items() if family_kind == kind]
