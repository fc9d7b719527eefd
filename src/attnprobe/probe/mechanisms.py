"""The mechanism registry: what each probe adds to a census, declared in the probe's own module.

A probe module lists its declarations in a module-level tuple `CENSUS`:

    CENSUS = (
        Stage("induction", run=census_stage, order=20, shard="induction.parquet",
              columns=("induction_score", "duplicate_score")),
        Mechanism("induction", stage="induction", column="induction_score", threshold=0.4, letter="I",
                  rank=1, panel="induction", matrix="induction", matrix_label="induction heads"),
    )

A `Stage` is one step of the census: `run(census)` measures and writes its files, `shard` is the
per-head table it leaves in `shards/` (merged into heads.parquet) with the `columns` it adds. A
`Mechanism` is what the census finds: a head role (`column` above its threshold), a figure panel, a
summary line and columns of the mechanism-loss matrix. The default `threshold` is declared here; a
run's thresholds live in `CensusConfig.thresholds` (written to its manifest), and everything that
decides a role reads them from there.

The census, the CLI summary, the matrix's census columns and the figures read `stages()` and
`mechanisms()`; nothing else lists mechanisms. A new mechanism is one new module in probe/ with a
`CENSUS` tuple (and its test): the registry finds it by itself.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd

from attnprobe.errors import AttnprobeError

if TYPE_CHECKING:
    from .census import Census


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[["Census"], None]
    order: int  # stages run in this order (ties by name)
    shard: str | None = None  # shards/<shard>: one row per (layer, head) with `columns`, merged into heads.parquet
    columns: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # stages whose files this one reads
    files: tuple[str, ...] = ()  # files it writes into the run directory (a damaged one makes it run again)
    description: str = ""


Summary = Callable[[Path, pd.DataFrame, dict], "str | None"]  # (run dir, heads table, thresholds) -> text
Presence = Callable[[Path, pd.DataFrame, dict], dict]  # (run dir, heads table, thresholds) -> matrix columns


@dataclass(frozen=True)
class Mechanism:
    name: str  # the role name in heads.parquet's `roles`, the threshold's key
    stage: str
    label: str  # how people call it: "retrieval heads"
    column: str | None = None  # heads-table column that decides the role (role: column > threshold)
    threshold: float | None = None  # default; None with a column: any value above 0 (a count)
    letter: str = ""  # role-map letter
    rank: int = 50  # order of roles, summary lines and role colours (first = strongest claim)
    panel: str | None = None  # census_scores panel title for `panel_column` (default `column`)
    panel_column: str | None = None
    summary: Summary | None = None  # the CLI's line; default: the role's heads above threshold
    matrix: str | None = None  # matrix columns <matrix>_heads and <matrix>_present (or `presence`)
    matrix_label: str = ""
    presence: Presence | None = None

    @property
    def is_role(self) -> bool:
        return self.column is not None

    def threshold_in(self, thresholds: dict) -> float:
        """This role's threshold in a run's thresholds (0 for count roles)."""
        if self.threshold is None:
            return 0.0
        if self.name not in thresholds:
            raise AttnprobeError(f"the run's thresholds lack '{self.name}': rerun the census")
        return float(thresholds[self.name])

    def holders(self, heads: pd.DataFrame, thresholds: dict) -> pd.DataFrame:
        """The heads that have this role."""
        if self.column not in heads:
            return heads.iloc[:0]
        return heads[heads[self.column].fillna(-1.0) > self.threshold_in(thresholds)]

    def summarise(self, run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> str | None:
        if self.summary is not None:
            return self.summary(run_dir, heads, thresholds)
        if not self.is_role or self.column not in heads:
            return None
        top = self.holders(heads, thresholds).sort_values(self.column, ascending=False)
        above = f"above {self.threshold_in(thresholds):g}" if self.threshold is not None else "with any"
        return (f"{len(top)} of {len(heads)} {above}" + (": " if len(top) else "")
                + ", ".join(f"{r.layer}.{r.head}={getattr(r, self.column):.2f}" for r in top.head(10).itertuples()))

    def matrix_columns(self, run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> dict:
        if self.presence is not None:
            return self.presence(run_dir, heads, thresholds)
        if self.matrix is None or self.column not in heads:
            return {}
        found = len(self.holders(heads, thresholds))
        return {f"{self.matrix}_heads": found, f"{self.matrix}_present": found > 0}


def _declarations() -> list:
    import attnprobe.probe as package

    found = []
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        found += list(getattr(importlib.import_module(f"{package.__name__}.{module}"), "CENSUS", ()))
    return found


@lru_cache(maxsize=1)
def stages() -> tuple[Stage, ...]:
    """Every census stage, in running order."""
    found = sorted((d for d in _declarations() if isinstance(d, Stage)), key=lambda s: (s.order, s.name))
    names = [s.name for s in found]
    for stage in found:
        missing = [n for n in stage.needs if n not in names]
        if missing or names.count(stage.name) > 1:
            raise AttnprobeError(f"census stage '{stage.name}' is declared twice or needs an unknown stage {missing}")
    return tuple(found)


@lru_cache(maxsize=1)
def mechanisms() -> tuple[Mechanism, ...]:
    """Every mechanism, strongest claim first (the order of roles and summary lines)."""
    found = sorted((d for d in _declarations() if isinstance(d, Mechanism)), key=lambda m: (m.rank, m.name))
    known = {s.name for s in stages()}
    for mechanism in found:
        if mechanism.stage not in known:
            raise AttnprobeError(f"mechanism '{mechanism.name}' names an unknown census stage '{mechanism.stage}'")
    return tuple(found)


def roles() -> tuple[Mechanism, ...]:
    return tuple(m for m in mechanisms() if m.is_role)


def default_thresholds() -> dict[str, float]:
    """Role name -> its declared default threshold: the default of `CensusConfig.thresholds`."""
    return {m.name: m.threshold for m in mechanisms() if m.threshold is not None}


def stage(name: str) -> Stage:
    for candidate in stages():
        if candidate.name == name:
            return candidate
    raise AttnprobeError(f"unknown census stage '{name}': choose from {', '.join(s.name for s in stages())}")


def plan(names: tuple[str, ...] | None, finished: Callable[[str], bool] = lambda name: False) -> list[Stage]:
    """The stages `names` (None: all) in running order; refused when one needs a stage that is neither
    chosen nor `finished` (it would read files nobody wrote)."""
    chosen = [stage(name) for name in names] if names is not None else list(stages())
    wanted = {s.name for s in chosen}
    for step in chosen:
        missing = [n for n in step.needs if n not in wanted and not finished(n)]
        if missing:
            raise AttnprobeError(f"census stage {step.name} needs {', '.join(missing)}: do not skip {', '.join(missing)}")
    return sorted(chosen, key=list(stages()).index)


def head_roles(row, thresholds: dict) -> list[str]:
    """The roles of one heads-table row, in rank order."""
    found = []
    for mechanism in roles():
        value = row.get(mechanism.column) if hasattr(row, "get") else None
        if value is not None and pd.notna(value) and value > mechanism.threshold_in(thresholds):
            found.append(mechanism.name)
    return found
