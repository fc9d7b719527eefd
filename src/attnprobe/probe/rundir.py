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


def same_settings(path: Path, wanted: dict, what: str, started: bool = False, noun: str = "settings",
                  merge: bool = False) -> None:
    """Work saved in a run directory is reused by a rerun only if it was made with these settings: record them
    (at `path`) with the first run and refuse others later, naming what changed (a silently mixed table otherwise).
    `what` names the saved work (plural: "the cells"); `merge`: a setting the record lacks is added to it, not
    refused (it did not matter to the earlier runs); `started`: the directory already holds such work, so settings that are missing (an older run) are refused too."""
    path = Path(path)
    wanted = json.loads(json.dumps(wanted, default=_plain))
    fix = f"rerun with the same options, or use a new --out (or delete {path.parent}) to start over"
    if path.exists():
        if not readable(path):
            raise AttnprobeError(f"{path} is damaged, so the {noun} that made {what} are unknown: {fix}")
        previous = read_json(path)
        compared = set(wanted) & set(previous) if merge else set(wanted) | set(previous)
        changed = sorted(k for k in compared if previous.get(k) != wanted.get(k))
        if changed:
            raise AttnprobeError(f"{what} in {path.parent} were made with other {noun} ({', '.join(changed)}): {fix}")
        if merge and set(wanted) - set(previous):
            write_json(path, {**previous, **wanted})
        return
    if started:
        raise AttnprobeError(f"{what} in {path.parent} do not say which {noun} made them (an older run): {fix}")
    write_json(path, wanted)


def census_heads(run_dir: Path | None, purpose: str = "ranking heads") -> pd.DataFrame:
    """A census run's heads table (--from), or one line naming what is missing or damaged and the fix."""
    if run_dir is None:
        raise AttnprobeError(f"{purpose} needs a census run: add --from RUN_DIR")
    path = Path(run_dir) / "heads.parquet"
    if not path.is_file():
        raise AttnprobeError(f"{path} not found: run `attnprobe census --out {run_dir}` first")
    try:
        heads = pd.read_parquet(path)
    except Exception:  # pyarrow raises several kinds of errors on a damaged file
        raise AttnprobeError(f"{path} is damaged (it does not read as parquet): rerun `attnprobe census --out {run_dir}`") from None
    if not {"layer", "head"} <= set(heads.columns):
        raise AttnprobeError(f"{path} has no layer and head columns (not a census heads table): rerun `attnprobe census --out {run_dir}`")
    return heads


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
        """Hold the run directory for one run: a second run writing the same directory is refused, not interleaved.
        Re-entrant within one process (the CLI locks before loading the model, the library again when it writes)."""
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / ".lock", "a+")
        except OSError as error:
            raise AttnprobeError(f"{self.root} cannot be used as a run directory ({error.strerror or error}): "
                                 "choose a writable directory with --out") from None
        key = str(self.root.resolve())
        if key in _HELD:
            handle.close()
            yield self
            return
        with handle:
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
            _HELD.add(key)
            try:
                yield self
            finally:
                _HELD.discard(key)
                if created and [p.name for p in self.root.iterdir()] == [".lock"]:  # a run that wrote nothing leaves nothing
                    (self.root / ".lock").unlink()
                    self.root.rmdir()
                fcntl.flock(handle, fcntl.LOCK_UN)


_HELD: set[str] = set()  # run directories this process has locked
