"""Backends: one module per way of getting into a model, all built on `base`.

`BACKENDS` maps each name to its module and class; `make_backend` and the parity tests read it. A
backend module is imported only when asked for (transformer-lens and nnsight are heavy imports).
"""
from __future__ import annotations

import importlib

from attnprobe.errors import AttnprobeError
from ..model import Model
from .base import Backend, Reads, SiteNotFired

BACKENDS = {  # name -> (module of this package, class)
    "native": ("native", "NativeBackend"),
    "transformer-lens": ("transformer_lens", "TransformerLensBackend"),
    "nnsight": ("nnsight", "NnsightBackend"),
}
ALIASES = {"tl": "transformer-lens"}

__all__ = ["BACKENDS", "Backend", "Reads", "SiteNotFired", "backend_class", "make_backend"]


def backend_class(name: str) -> type[Backend]:
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise AttnprobeError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_backend(name: str, model: Model) -> Backend:
    if not isinstance(model, Model):
        raise AttnprobeError(f"make_backend needs a Model (from load_model), got {type(model).__name__}")
    return backend_class(name)(model)
