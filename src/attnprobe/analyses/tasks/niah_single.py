"""RULER's single needle in a haystack: one key, one value (a 7-digit number, a word or a UUID) in
evaluation prose; the question asks for it."""
from __future__ import annotations

from functools import partial

from attnprobe.analyses.tasks import magic
from attnprobe.analyses.tasks.registry import Task


def _task(value: str, new_tokens: int) -> Task:
    name = f"niah_single_{value}"
    return Task(name, name, f"NIAH single ({value})", build=partial(_build, name, value), score=magic.score,
                scoring=magic.SCORING, description=f"one needle, its value a {value}", max_new_tokens=new_tokens)


def _build(name, value, n, length, seed, tokenizer, window, setting):
    return magic.build(name, n, length, seed, tokenizer, setting, value)


TASKS = (_task("number", 16), _task("word", 16), _task("uuid", 48))
