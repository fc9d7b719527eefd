"""A run directory: atomic writes (temp file + rename) and finished-shard bookkeeping for resuming."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from attnprobe.hooks.io import atomic_write as _atomic


def write_json(path: Path, data) -> Path:
    def write(temp):
        with open(temp, "w") as handle:
            json.dump(data, handle, indent=1, default=_plain)
    return _atomic(Path(path), write)


def write_parquet(path: Path, table: pd.DataFrame) -> Path:
    return _atomic(Path(path), lambda temp: table.to_parquet(temp, index=False))


def write_jsonl(path: Path, records) -> Path:
    def write(temp):
        with open(temp, "w") as handle:
            for record in records:
                handle.write(json.dumps(record, default=_plain) + "\n")
    return _atomic(Path(path), write)


def read_json(path: Path):
    with open(path) as handle:
        return json.load(handle)


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


class RunDir:
    """Paths of one run, plus `shards/` where finished stages and samples are kept until the run ends."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.shards = self.root / "shards"

    def shard(self, name: str) -> Path:
        return self.shards / name

    def done(self, name: str) -> bool:
        return self.shard(name).exists()

    def __truediv__(self, name: str) -> Path:
        return self.root / name
