"""The census's stages and roles as the probe modules declare them, read from their source without importing them.

The probe modules import torch, and `attnprobe census --help` and the census's option checks must answer
without it. Each module's `CENSUS` tuple (see mechanisms.py) is parsed with `ast`: a Stage's name, order and
description, a Mechanism's name, label and threshold, written as literals. The registry
(`mechanisms.stages()`, `mechanisms.mechanisms()`) stays the truth: tests/test_cli_options.py holds this
reading equal to it, so a declaration it cannot read fails there, not at a user's terminal.
"""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from dataclasses import dataclass
from functools import lru_cache

import attnprobe.probe as package

STAGE_FIELDS = ("name", "run", "order", "shard", "columns", "needs", "files", "description")  # mechanisms.Stage
MECHANISM_FIELDS = ("name", "stage", "label", "column", "threshold", "letter", "rank")  # mechanisms.Mechanism, as far as read


@dataclass(frozen=True)
class Declared:
    stages: tuple[tuple[str, str], ...]  # (name, description) in running order
    thresholds: dict[str, float]  # role -> default threshold
    labels: tuple[str, ...]  # every mechanism's label, strongest claim first (rank, name)


def _literal(call: ast.Call, fields: tuple[str, ...], name: str, path: str):
    position = fields.index(name)
    node = call.args[position] if position < len(call.args) else next((k.value for k in call.keywords if k.arg == name), None)
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{path}: write CENSUS's {name} as a literal (probe/declared.py reads it without importing torch)") from None


def _calls(path: str):
    """The Stage(...) and Mechanism(...) calls of the module's `CENSUS` tuple."""
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    if "CENSUS" not in source:
        return
    for node in ast.parse(source, path).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CENSUS" for t in node.targets):
            for item in getattr(node.value, "elts", ()):
                if isinstance(item, ast.Call) and getattr(item.func, "id", None) in ("Stage", "Mechanism"):
                    yield item.func.id, item


@lru_cache(maxsize=4)
def _read(search_path: tuple[str, ...]) -> Declared:
    stages, found = [], []
    for module in sorted(m.name for m in pkgutil.iter_modules(list(search_path))):
        path = importlib.util.find_spec(f"{package.__name__}.{module}").origin
        for kind, call in _calls(path):
            if kind == "Stage":
                stages.append((_literal(call, STAGE_FIELDS, "order", path), _literal(call, STAGE_FIELDS, "name", path),
                               _literal(call, STAGE_FIELDS, "description", path) or ""))
            else:
                found.append((_literal(call, MECHANISM_FIELDS, "rank", path) or 50, _literal(call, MECHANISM_FIELDS, "name", path),
                              _literal(call, MECHANISM_FIELDS, "label", path), _literal(call, MECHANISM_FIELDS, "threshold", path)))
    found.sort(key=lambda m: m[:2])  # the registry's order: strongest claim first
    return Declared(tuple((name, text) for _, name, text in sorted(stages)),
                    {name: threshold for _, name, _, threshold in found if threshold is not None},
                    tuple(label for _, _, label, _ in found))


def declared() -> Declared:
    """What the probe package (as its `__path__` stands now) declares."""
    return _read(tuple(package.__path__))


def stage_names() -> list[str]:
    return [name for name, _ in declared().stages]


def default_thresholds() -> dict[str, float]:
    """Role name -> its declared default threshold (what `mechanisms.default_thresholds()` returns)."""
    return dict(declared().thresholds)
