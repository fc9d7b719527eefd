"""A run directory: atomic writes (temp file + rename) and finished-shard bookkeeping for resuming."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import pandas as pd

from attnprobe.errors import AttnprobeError
from attnprobe.io import atomic_write as _atomic


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


def readable(path: Path) -> bool:
    """Whether `path` exists and reads back whole (parquet, JSON or JSON lines): a damaged file is redone."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        else:
            read_json(path)
        return True
    except Exception:  # missing, truncated or not what its name says (pyarrow raises several kinds)
        return False


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

    @contextlib.contextmanager
    def lock(self):
        """Hold the run directory for one run: a second run writing the same directory is refused, not interleaved."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise AttnprobeError(f"{self.root} is in use by another attnprobe run (pid {holder}): "
                                     "wait for it to finish or use another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
