"""The evaluation pools, declared in one place: where every needle, key, value, word and haystack a
recall task uses comes from, and the check that training data stays out of them.

- Haystacks: the prose's "evaluation" token range (`probe.texts.LAYOUT`), disjoint from the census
  range that ranks heads and the fit range that trains; the noise haystack is one fixed sentence
  repeated (RULER's), which holds nothing to recall.
- Needles: the packaged needles the census did not rank heads with (`evaluation_needles`).
- Keys and values (words, numbers, UUID-like keys): every item has a *side* fixed by a hash of its
  text; tasks draw only evaluation-side items, training data generators only training-side ones
  (`draw(..., side="training")`), so no item to recall is ever trained on.

A training data generator calls `assert_disjoint(items, texts)` on what it made (the keys and values
it teaches, the texts it trains on): an evaluation item or needle there is refused.
"""
from __future__ import annotations

import hashlib
import random
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from attnprobe.errors import AttnprobeError
from attnprobe.probe import texts
from attnprobe.probe.retrieval import DEFAULT_NEEDLES, load_needles

SIDES = ("evaluation", "training")
KINDS = ("word", "number", "uuid", "name")
_SALT = b"attnprobe-recall-pools/"
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def side(item: str) -> str:
    """Which pool an item (a word, number or UUID, compared lowercase) belongs to, by its hash."""
    digest = hashlib.sha256(_SALT + item.strip().lower().encode()).digest()
    return SIDES[digest[0] & 1]


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,9}\b", texts.prose()))))


@lru_cache(maxsize=2)
def words(pool: str = "evaluation") -> tuple[str, ...]:
    """The lowercase words (4-9 letters, from the offline prose's vocabulary) of one side."""
    _check_side(pool)
    return tuple(w for w in _vocabulary() if side(w) == pool)


def _check_side(pool: str) -> None:
    if pool not in SIDES:
        raise AttnprobeError(f"unknown pool '{pool}': choose evaluation or training")


def draw(kind: str, n: int, rng: random.Random, pool: str = "evaluation", digits: int = 7) -> list[str]:
    """`n` distinct items of `kind` (word, number of `digits` digits, UUID, or variable name) from one
    side, drawn with `rng`."""
    _check_side(pool)
    if kind == "word":
        vocabulary = words(pool)
        if len(vocabulary) < n:
            raise AttnprobeError(f"only {len(vocabulary)} {pool} words for {n} keys; use fewer keys")
        return rng.sample(vocabulary, n)
    if kind == "number":
        make = lambda: str(rng.randrange(10 ** (digits - 1), 10 ** digits))  # noqa: E731
    elif kind == "name":  # a variable name: five capital letters
        make = lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))  # noqa: E731
    elif kind == "uuid":
        make = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))  # noqa: E731
    else:
        raise AttnprobeError(f"unknown kind '{kind}': choose one of {', '.join(KINDS)}")
    found: list[str] = []
    while len(found) < n:  # about half of all items are on each side
        item = make()
        if side(item) == pool and item not in found:
            found.append(item)
    return found


def evaluation_needles(used_for_ranking: int = DEFAULT_NEEDLES) -> list[int]:
    """Indices of the packaged needles a census that ranked heads with the first `used_for_ranking` never saw."""
    available = len(load_needles())
    if not 0 <= used_for_ranking < available:
        raise AttnprobeError(f"the census used {used_for_ranking} of the {available} packaged needles: none is left "
                             "for evaluation; rank heads with fewer needles (census --needles)")
    return list(range(used_for_ranking, available))


@dataclass(frozen=True)
class Pools:
    """What the tasks evaluate with: the words of the evaluation side, the evaluation needles, the
    haystack's text range and the side rule for numbers and UUIDs (too many to list)."""

    words: frozenset[str]
    needles: tuple[dict, ...]
    haystack_range: str
    numbers_and_uuids: str


def evaluation_pools(used_for_ranking: int = 0) -> Pools:
    """The evaluation pools; needles: those left by a census that ranked with `used_for_ranking`
    (0: every packaged needle may be evaluated on, so none may be trained on)."""
    needles = load_needles()
    return Pools(frozenset(words("evaluation")), tuple(needles[i] for i in range(used_for_ranking, len(needles))),
                 "evaluation", "side(item) == 'evaluation'")


def assert_disjoint(items: Iterable[str] = (), training_texts: Iterable[str] = ()) -> None:
    """Refuse training data that overlaps the evaluation pools: an item to recall (a key or value:
    word, number, UUID) on the evaluation side, or a text holding a packaged needle or an
    evaluation-side UUID. Natural words in a text are not items and are not checked."""
    pools = evaluation_pools()
    clashes = [item for item in items if side(str(item)) == "evaluation"]
    for text in training_texts:
        lowered = text.lower()
        clashes += [n["needle"] for n in pools.needles if n["needle"].lower() in lowered]
        clashes += [key for key in _UUID.findall(lowered) if side(key) == "evaluation"]
    if clashes:
        raise AttnprobeError(f"the training data holds {len(clashes)} evaluation item(s), e.g. '{clashes[0]}': "
                             "draw training keys and values with tasks.pools.draw(..., pool='training')")
