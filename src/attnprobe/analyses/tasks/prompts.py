"""Pieces the task modules share: encoding, haystacks, needles inserted at depths, prompts fitted to a
token length, and the scoring rules."""
from __future__ import annotations

import random
import re
from typing import Sequence

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.registry import make_kernel, names
from attnprobe.probe import texts
from attnprobe.probe.retrieval import insertion_point, wrap_prompt

NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# tokens a windowed hybrid keeps exact (sinks + window): what lies further back it cannot read
BEYOND_WINDOW = max(make_kernel(name, 1, 8).cached_tokens for name in names("hybrid"))


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def noise_ids(tokenizer, n_tokens: int) -> list[int]:
    """RULER's noise haystack: one fixed sentence group repeated, `n_tokens` long."""
    unit = encode(tokenizer, NOISE)
    return (unit * (n_tokens // len(unit) + 1))[:n_tokens]


def essay_ids(tokenizer, n_tokens: int, path=None) -> list[int]:
    """`n_tokens` of prose from the evaluation text range; a range shorter than that is repeated
    (a longer text file, `path`, avoids the repeat)."""
    start, end = texts.token_range(tokenizer, "evaluation", path)
    size = min(n_tokens, end - start)
    if size < 1:
        raise AttnprobeError("the evaluation text range is empty: use a longer text file")
    ids = texts.haystack_ids(tokenizer, size, path, purpose="evaluation")
    return (ids * (n_tokens // size + 1))[:n_tokens]


def far_depth(rng: random.Random, haystack_tokens: int, beyond: int = BEYOND_WINDOW) -> float:
    """A depth (0-1) drawn so that at least `beyond` haystack tokens follow it: a windowed hybrid cannot see it."""
    return rng.uniform(0.0, max(0.0, 1.0 - beyond / max(haystack_tokens, 1)))


def insert(tokenizer, haystack: Sequence[int], pieces: Sequence[tuple[float, list[int]]]) -> list[int]:
    """`haystack` with each (depth, ids) piece inserted after the sentence end nearest before its depth."""
    haystack = list(haystack)
    at = sorted(((insertion_point(tokenizer, haystack, depth), index) for index, (depth, _) in enumerate(pieces)))
    body, last = [], 0
    for point, index in at:
        body += haystack[last:point] + list(pieces[index][1])
        last = point
    return body + haystack[last:]


def fitted_prompt(tokenizer, length: int, intro: str, pieces: Sequence[list[int]], question: str, reply: str,
                  rng: random.Random, bos: bool | None, haystack: str = "essay", path=None,
                  ordered: bool = False) -> tuple[list[int], list[float]]:
    """(prompt, depths): a prompt of exactly `length` tokens: intro, a haystack ("essay": evaluation
    prose, or "noise") with `pieces` inserted at depths drawn beyond the hybrids' window (`far_depth`),
    then `question` in the user's turn (chat template where the tokenizer has one) and `reply`, where
    the answer starts. `ordered`: the pieces keep their order along the haystack."""
    intro_ids = encode(tokenizer, intro)
    frame, _ = wrap_prompt(tokenizer, intro_ids, question, "auto", bos, reply=reply)
    room = length - len(frame) - sum(len(ids) for ids in pieces)
    if room < 2 * BEYOND_WINDOW:
        raise AttnprobeError(f"length {length} leaves {room} haystack tokens: use lengths of at least "
                             f"{length - room + 2 * BEYOND_WINDOW} tokens")
    hay = essay_ids(tokenizer, room, path) if haystack == "essay" else noise_ids(tokenizer, room)
    depths = [far_depth(rng, room) for _ in pieces]
    depths = sorted(depths) if ordered else depths
    body = insert(tokenizer, hay, list(zip(depths, pieces)))
    prompt, _ = wrap_prompt(tokenizer, intro_ids + body, question, "auto", bos, reply=reply)
    return prompt, depths


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def contains_all(response: str, answers: Sequence[str]) -> bool:
    """RULER's string match: every answer appears in the response (case-insensitive substring)."""
    lowered = response.lower()
    return all(answer.lower() in lowered for answer in answers)
