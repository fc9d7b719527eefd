"""RULER's multi-key needle in a haystack: four needles with different keys; one key is asked for,
the other three are distractors."""
from __future__ import annotations

from attnprobe.analyses.tasks import magic
from attnprobe.analyses.tasks.registry import Task

KEYS = 4


def build(n, length, seed, tokenizer, window, setting):
    return magic.build("niah_multikey", n, length, seed, tokenizer, setting, "number", keys=KEYS)


TASKS = (Task("niah_multikey", "niah_multikey", "NIAH multi-key", build=build, score=magic.score, scoring=magic.SCORING,
              description=f"{KEYS} needles with different keys, one asked for", max_new_tokens=16),)
