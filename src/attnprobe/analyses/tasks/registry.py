"""The task registry: every recall task declared in its own module, found by itself.

A task module in analyses/tasks/ lists its tasks in a module-level tuple `TASKS`:

    TASKS = (Task("passkey", "passkey", build=build, score=score, scoring="the first number ... is the key",
                  sizes=("passkey_lengths", "passkey_samples", "passkey_depths"), ...),)

`build(n, length, seed, tokenizer, window, setting)` makes `n` samples (prompt ids, answers,
metadata) at `length` (prompt tokens unless the task says otherwise), deterministic in `seed`;
`score(sample, response)` says whether a greedy generation (or, for a teacher-forced task, the
argmax continuation) is right. The matrix, the budget sweep, the ablation sweep, the figures and
the CLI read `tasks()`: a new task is one module with a `TASKS` tuple, and its test.
"""
from __future__ import annotations

import importlib
import pkgutil
import random
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import pandas as pd
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.probe.retrieval import DEFAULT_NEEDLES, answer_text, greedy_decode
from attnprobe.analyses import stats

COLUMNS = ["variant", "task", "length", "depth", "sample", "correct"]


@dataclass(frozen=True)
class Setting:
    """What a caller may set besides n, length and seed."""

    bos: bool | None = None  # None: the tokenizer's own convention
    depths: tuple[float, ...] | None = None  # needle depths (0-1) of depth-grid tasks; None: the task's own
    haystack: str | None = None  # a UTF-8 text file whose evaluation range gives prose haystacks
    ranking_needles: int = DEFAULT_NEEDLES  # packaged needles the census ranked heads with (never evaluated on)


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    answers: tuple[str, ...]
    metadata: dict = field(default_factory=dict)  # depth, sample (the table's columns), anything else
    answer_ids: tuple[int, ...] = ()  # teacher-forced tasks: the continuation fed and scored


Build = Callable[[int, int, int, object, "int | None", Setting], list[Sample]]


@dataclass(frozen=True)
class Task:
    name: str  # recall.parquet's `task`, the --tasks name
    column: str  # matrix columns <column>_acc, _ci_low, _ci_high, _n
    label: str  # how figures name it
    build: Build
    score: Callable[[Sample, str], bool]
    scoring: str  # the rule `score` applies, for help texts and docs
    description: str
    sizes: tuple[str, str, str | None] = ("ruler_lengths", "ruler_samples", None)  # size fields: lengths, samples, depths
    length_unit: str = "prompt tokens"
    max_new_tokens: int = 32
    stop_at_newline: bool = False  # the response ends at its first newline after text (else: all max_new_tokens)
    teacher_forced: bool = False  # scored on the argmax continuation of one teacher-forced pass
    grid: bool = False  # a depth x length task (niah.parquet, the recall_grids figure)


def _declarations() -> list[Task]:
    package = sys.modules[__package__]  # analyses.tasks, imported before any of its modules

    found = []
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        found += list(getattr(importlib.import_module(f"{package.__name__}.{module}"), "TASKS", ()))
    return found


@lru_cache(maxsize=1)
def tasks() -> tuple[Task, ...]:
    """Every registered task, by name."""
    found = sorted(_declarations(), key=lambda t: t.name)
    for key in ("name", "column"):
        values = [getattr(t, key) for t in found]
        if len(values) != len(set(values)):
            raise AttnprobeError(f"two recall tasks declare one {key}: {sorted(v for v in values if values.count(v) > 1)}")
    return tuple(found)


def names() -> tuple[str, ...]:
    return tuple(t.name for t in tasks())


def task(name: str) -> Task:
    for candidate in tasks():
        if candidate.name == name:
            return candidate
    raise AttnprobeError(f"unknown recall task '{name}': choose from {', '.join(names())}")


def help_text() -> str:
    """One line per task, for the CLI's --tasks help."""
    return "; ".join(f"{t.name} ({t.description}; length = {t.length_unit})" for t in tasks())


def rng_for(name: str, seed: int, length: int) -> random.Random:
    """The random source of one task, seed and length: samples differ between lengths and tasks."""
    return random.Random(f"{name}:{seed}:{length}")


def needed_tokens(t: Task, sample: Sample) -> int:
    return len(sample.prompt_ids) + (max(len(sample.answer_ids) - 1, 0) if t.teacher_forced else t.max_new_tokens)


def build(name: str, n: int, length: int, seed: int, tokenizer, window: int | None,
          setting: Setting = Setting()) -> list[Sample]:
    """`n` samples of task `name` at `length`, refused when one does not fit the model's window."""
    t = task(name)
    samples = t.build(n, length, seed, tokenizer, window, setting)
    longest = max((needed_tokens(t, s) for s in samples), default=0)
    if window and longest > window:
        raise AttnprobeError(f"{name} at length {length} needs {longest} tokens but the model's window is {window}; "
                             "use shorter lengths")
    return samples


def _answer(model, t: Task, sample: Sample) -> tuple[str, dict]:
    """The model's response to one sample, and task-specific columns."""
    if not t.teacher_forced:
        generated = greedy_decode(model, sample.prompt_ids, t.max_new_tokens, stop_at_newline=t.stop_at_newline)
        text = answer_text(model.tokenizer, generated) if t.stop_at_newline else \
            model.tokenizer.decode(generated, skip_special_tokens=True).strip()
        return text, {}
    fed = list(sample.prompt_ids) + list(sample.answer_ids[:-1])
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([fed], device=model.device), use_cache=False).logits[0]
    start = len(sample.prompt_ids) - 1
    predicted = logits[start:start + len(sample.answer_ids)].argmax(dim=-1).cpu()
    hits = predicted == torch.tensor(sample.answer_ids)
    return model.tokenizer.decode(predicted.tolist()), {"token_accuracy": float(hits.float().mean())}


def evaluate(model, name: str, lengths: Sequence[int], n: int, seed: int = 0, variant: str = "base",
             setting: Setting = Setting()) -> pd.DataFrame:
    """Task `name` at each length, `n` samples each, under whatever edits are active: one row per
    sample (variant, task, length, depth, sample, correct, answer, response, and token_accuracy for a
    teacher-forced task)."""
    t, rows = task(name), []
    window = model.info.max_context or None
    for length in lengths:
        for sample in build(name, n, length, seed, model.tokenizer, window, setting):
            response, extra = _answer(model, t, sample)
            rows.append({"variant": variant, "task": name, "length": length, "depth": sample.metadata.get("depth", float("nan")),
                         "sample": sample.metadata.get("sample", 0), "correct": bool(t.score(sample, response)),
                         "answer": " | ".join(sample.answers), "response": response, **extra})
    extra_columns = ["token_accuracy"] if t.teacher_forced else []
    return pd.DataFrame(rows, columns=COLUMNS + ["answer", "response"] + extra_columns)


# ---- sizes: what the matrix and the sweeps run ----------------------------------------------------

def sized(name: str, sizes) -> tuple[tuple[int, ...], int, tuple[float, ...] | None]:
    """(lengths, samples per length, depths) of task `name` from a sizes dataclass's fields."""
    t = task(name)
    lengths_field, samples_field, depths_field = t.sizes
    missing = [f for f in t.sizes if f and not hasattr(sizes, f)]
    if missing:
        raise AttnprobeError(f"task {name} needs the sizes {', '.join(missing)}, which {type(sizes).__name__} lacks")
    depths = tuple(getattr(sizes, depths_field)) if depths_field else None
    n = int(getattr(sizes, samples_field)) * (len(depths) if depths else 1)
    return tuple(getattr(sizes, lengths_field)), n, depths


def run_sized(model, names_: Sequence[str], sizes, variant: str, bos: bool | None = None,
              progress: Callable[[str], None] = lambda m: None) -> pd.DataFrame:
    """Every task of `names_` at its sizes in `sizes`, as one table."""
    tables = []
    for name in names_:
        lengths, n, depths = sized(name, sizes)
        progress(f"{variant}: {task(name).label}")
        setting = Setting(bos=bos, depths=depths, haystack=getattr(sizes, "niah_haystack", None))
        tables.append(evaluate(model, name, lengths, n, variant=variant, setting=setting))
    return pd.concat(tables, ignore_index=True)


def preflight(model, names_: Sequence[str], sizes, allow_small: bool = False,
              say: Callable[[str], None] | None = None) -> None:
    """Refuse, before any model work, unknown tasks, lengths past the window and samples too few for
    an interval (`stats.check_sample_size`); builds one sample of each task at its longest length."""
    if not names_:
        raise AttnprobeError(f"no recall task chosen: choose from {', '.join(names())}")
    on_gpu = getattr(getattr(model, "device", None), "type", "cpu") == "cuda"
    for name in names_:
        lengths, n, depths = sized(name, sizes)
        build(name, 1, max(lengths), 0, model.tokenizer, model.info.max_context or None,
              Setting(depths=depths, haystack=getattr(sizes, "niah_haystack", None)))
        total = n * len(lengths)
        stats.check_sample_size(total, f"{name} ({total} samples per row)", on_gpu, allow_small, say or stats.say)
