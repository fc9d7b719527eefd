"""flash-linear-attention's torch references, loaded by file path (`import fla.ops` needs triton and a GPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def fla_reference(relative: str):
    """The module at fla/<relative> (e.g. "ops/gla/naive.py"); skips the test where fla-core is not installed."""
    spec = importlib.util.find_spec("fla")  # a top-level name: found without running fla/__init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed: pip install -e '.[fla]' (the test extra includes it)")
    path = Path(spec.submodule_search_locations[0]) / relative
    loaded = importlib.util.spec_from_file_location(f"fla_reference_{path.parent.name}", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module
