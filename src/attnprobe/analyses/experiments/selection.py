"""Head selections for `ablate`, `swap` and `convert`.

    --heads 3.1,7.4                       explicit layer.head pairs
    --heads top:10:retrieval_score        the 10 best heads by a score of a census run (--from RUN_DIR)
    --heads random:10 --seed 0            10 random heads, never one named by --exclude
    --heads all                           every head
    --layers 0-29:every4                  every head of layers 0, 4, 8, ... (ranges, lists, :everyN)
"""
from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import ModelInfo
from attnprobe.probe.rundir import census_heads

Head = tuple[int, int]


def _check(head: Head, info: ModelInfo) -> Head:
    layer, index = head
    if not 0 <= layer < info.n_layers:
        raise AttnprobeError(f"layer {layer} is out of range: this model has layers 0-{info.n_layers - 1}")
    if not 0 <= index < info.n_heads:
        raise AttnprobeError(f"head {index} is out of range: this model has heads 0-{info.n_heads - 1} per layer")
    return head


def heads_table(run_dir: Path) -> pd.DataFrame:
    """A census run's heads.parquet, refused with the fix when it is missing or damaged."""
    return census_heads(run_dir)


def _scores(run_dir: Path | None, score: str) -> pd.DataFrame:
    heads = census_heads(run_dir, f"selecting by '{score}'")
    numeric = [c for c in heads.columns if c not in ("layer", "head", "kv_head") and pd.api.types.is_numeric_dtype(heads[c])]
    if score not in numeric:
        raise AttnprobeError(f"unknown score '{score}': choose one of {', '.join(numeric)}")
    return heads


def top_heads(run_dir: Path | None, k: int, score: str) -> list[Head]:
    heads = _scores(run_dir, score)
    best = heads.dropna(subset=[score]).sort_values([score, "layer", "head"], ascending=[False, True, True]).head(k)
    return [(int(r.layer), int(r.head)) for r in best.itertuples()]


def parse_layers(text: str, info: ModelInfo) -> list[int]:
    layers: list[int] = []
    for part in text.split(","):
        part, _, every = part.partition(":every")
        try:
            low, _, high = part.partition("-")
            low_i, high_i = int(low), int(high or low)
            step = int(every) if every else 1
        except ValueError:
            raise AttnprobeError(f"cannot read layers '{text}': use e.g. 3,5,7 or 0-29 or 0-29:every4") from None
        if step < 1:
            raise AttnprobeError(f"cannot read layers '{text}': :everyN needs N of at least 1, e.g. 0-29:every4")
        for layer in range(low_i, high_i + 1, step):
            _check((layer, 0), info)
            layers.append(layer)
    return sorted(set(layers))


def parse_heads(text: str | None, info: ModelInfo, run_dir: Path | None = None, seed: int = 0,
                exclude: str | None = None, layers: str | None = None) -> list[Head]:
    """Resolve --heads / --layers / --exclude into a sorted list of (layer, head)."""
    chosen: list[Head] = []
    if layers:
        chosen += [(layer, h) for layer in parse_layers(layers, info) for h in range(info.n_heads)]
    if text:
        chosen += _parse_one(text, info, run_dir, seed, exclude)
    if not chosen:
        raise AttnprobeError("no heads selected: give --heads (e.g. 3.1,7.4 or top:10:retrieval_score) or --layers")
    return sorted(set(chosen))


def _parse_one(text: str, info: ModelInfo, run_dir, seed, exclude) -> list[Head]:
    kind, _, rest = text.partition(":")
    everyone = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    if text == "all":
        return everyone
    if kind == "top":
        count, _, score = rest.partition(":")
        return top_heads(run_dir, _count(count, text), score or "retrieval_score")
    if kind == "random":
        banned = set(_parse_one(exclude, info, run_dir, seed, None)) if exclude else set()
        pool = [h for h in everyone if h not in banned]
        count = _count(rest, text)
        if count > len(pool):
            raise AttnprobeError(f"cannot draw {count} random heads: only {len(pool)} are left after --exclude")
        return sorted(random.Random(seed).sample(pool, count))
    heads = []
    for item in text.split(","):
        try:
            layer, head = (int(x) for x in item.strip().split("."))
        except ValueError:
            raise AttnprobeError(f"cannot read head '{item}': write LAYER.HEAD, e.g. 3.1") from None
        heads.append(_check((layer, head), info))
    return heads


def _count(text: str, whole: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise AttnprobeError(f"cannot read '{whole}': the count must be a whole number") from None
    if value < 1:
        raise AttnprobeError(f"'{whole}' selects no heads: the count must be at least 1")
    return value


def by_layer(heads: list[Head]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for layer, head in heads:
        grouped.setdefault(layer, []).append(head)
    return grouped
