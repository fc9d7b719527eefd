"""RULER's multi-value needle in a haystack: one key holds four values; all four must be returned."""
from __future__ import annotations

from attnprobe.analyses.tasks import magic
from attnprobe.analyses.tasks.registry import Task

VALUES = 4


def build(n, length, seed, tokenizer, window, setting):
    return magic.build("niah_multivalue", n, length, seed, tokenizer, setting, "number", values=VALUES)


TASKS = (Task("niah_multivalue", "niah_multivalue", "NIAH multi-value", build=build, score=magic.score,
              scoring=magic.SCORING, description=f"one key with {VALUES} values, all asked for", max_new_tokens=64),)
