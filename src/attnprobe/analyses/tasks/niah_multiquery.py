"""RULER's multi-query needle in a haystack: four keys, all asked for in one question."""
from __future__ import annotations

from attnprobe.analyses.tasks import magic
from attnprobe.analyses.tasks.registry import Task

QUERIES = 4


def build(n, length, seed, tokenizer, window, setting):
    return magic.build("niah_multiquery", n, length, seed, tokenizer, setting, "number", keys=QUERIES, queries=QUERIES)


TASKS = (Task("niah_multiquery", "niah_multiquery", "NIAH multi-query", build=build, score=magic.score,
              scoring=magic.SCORING, description=f"{QUERIES} keys, all asked for in one question", max_new_tokens=64),)
