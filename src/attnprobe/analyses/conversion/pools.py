"""The training pools of the retrieval documents and the evaluation's, and the checks that keep them apart:
what a training document may teach (numbers, words, needle templates, the prose's fit range) never meets what
the evaluation asks for. The evaluation's pools come from analyses/tasks/pools.py where this checkout has it
(each item sided by a hash), else from today's recall.py (mirrored here)."""
from __future__ import annotations

import itertools
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from attnprobe.errors import AttnprobeError

TRAINING_NUMBERS = range(100_000, 1_000_000)
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
NEEDLE_TEMPLATES = (  # (needle, question, answer field): none is a packaged needle's sentence
    ("The {a} beacon on {b} hill signals the number {n}.", "What number does the {a} beacon on {b} hill signal?", "n"),
    ("The courier from {a} carries a parcel marked {b}.", "What mark is on the parcel the courier from {a} carries?", "b"),
    ("In the village of {a} the well is guarded by a goat called {b}.", "What is the goat that guards the well of {a} called?", "b"),
    ("The ledger of the {a} guild ends with the entry {n}.", "With which entry does the ledger of the {a} guild end?", "n"),
)


@lru_cache(maxsize=1)
def _made_up_words() -> tuple[str, ...]:
    """Every consonant-vowel x 3 word (343,000 of them, e.g. 'belako')."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    return tuple("".join(parts) for parts in itertools.product(syllables, repeat=3))


def _word_file(path: str) -> tuple[str, ...]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise AttnprobeError(f"word list not found: {file}; pass a text file with one word a line")
    words = tuple(dict.fromkeys(w.strip() for w in file.read_text(encoding="utf-8", errors="replace").splitlines() if w.strip()))
    if len(words) < 64:
        raise AttnprobeError(f"{file} holds {len(words)} words: a key-value document needs at least 64 distinct words")
    return words


def _tasks_pools():
    """analyses/tasks/pools.py, the evaluation's declared pools (which replace recall.py), where this checkout has it."""
    try:
        from attnprobe.analyses.tasks import pools
    except ImportError:
        return None
    return pools


def evaluation_pools() -> dict:
    """What the evaluation draws from: `is_item(text)` (a key or value the evaluation may ask for), its words, the
    needles (every packaged one: any may evaluate) and the text ranges it reads. From analyses/tasks/pools.py where
    present (its hash side rule), else today's recall.py (mirrored here; a test checks the mirror against what
    recall.py draws)."""
    from attnprobe.probe.retrieval import load_needles

    ranges = {"census", "evaluation", "perplexity"}
    tasks = _tasks_pools()
    if tasks is not None:
        declared = tasks.evaluation_pools()
        return {"is_item": lambda item: tasks.side(str(item)) == "evaluation", "words": set(declared.words),
                "needles": list(load_needles()), "text_ranges": ranges | {declared.haystack_range},
                "source": "analyses/tasks/pools.py"}
    from attnprobe.analyses import recall

    vocabulary = set(recall._vocabulary())  # kv_recall's keys; its values are 4-digit, passkey's keys 5-digit

    def is_item(item) -> bool:
        return str(item) in vocabulary or (str(item).isdigit() and 1_000 <= int(item) < 100_000)
    return {"is_item": is_item, "words": vocabulary, "needles": list(load_needles()), "text_ranges": ranges,
            "source": "analyses/recall.py"}


def training_pools(words_file: str | None = None, evaluation: dict | None = None) -> dict:
    """What the training documents draw from: numbers of TRAINING_NUMBERS that are no evaluation item, made-up
    words that are none (or the words of `words_file`, checked by `check_pools`), the needle templates, the fit range."""
    evaluation = evaluation or evaluation_pools()
    source = _word_file(words_file) if words_file else _made_up_words()
    words = source if words_file else tuple(w for w in source if not evaluation["is_item"](w) and w not in evaluation["words"])
    return {"numbers": TRAINING_NUMBERS, "words": words, "needles": NEEDLE_TEMPLATES, "text_ranges": {"fit"}}


def check_pools(training: dict, evaluation: dict) -> None:
    """Refuse training pools that share a word, needle or text range with the evaluation's (numbers are checked as
    they are drawn: `Builder.number`)."""
    shared = sorted(w for w in training["words"] if w in evaluation["words"] or evaluation["is_item"](w))
    if shared:
        raise AttnprobeError(f"the training word list holds {len(shared)} evaluation words (e.g. '{shared[0]}'): remove them")
    sentences = {n["needle"] for n in evaluation["needles"]} | {n["answer"] for n in evaluation["needles"]}
    leaked = [t for template in training["needles"] for t in template[:2] if any(s in t for s in sentences)]
    if leaked:
        raise AttnprobeError(f"a training needle template holds an evaluation needle ('{leaked[0]}'): write another")
    if training["text_ranges"] & evaluation["text_ranges"]:
        raise AttnprobeError("the training haystack reads an evaluation text range: read the 'fit' range only")


def assert_training_items(items: Sequence[str]) -> None:
    """The keys and values documents taught, checked once more by the evaluation's own rule (tasks.pools.assert_disjoint
    where present): one that is an evaluation item is refused."""
    tasks = _tasks_pools()
    if tasks is not None:
        tasks.assert_disjoint(items)
        return
    clashes = [item for item in items if evaluation_pools()["is_item"](item)]
    if clashes:
        raise AttnprobeError(f"the training documents hold {len(clashes)} evaluation item(s), e.g. '{clashes[0]}'")


def refuse_evaluation_text(documents: Sequence[str], source: str = "the training data") -> None:
    """Refuse training text that holds an evaluation needle (its sentence), so no row trains on its test."""
    for needle in evaluation_pools()["needles"]:
        if any(needle["needle"] in document for document in documents):
            raise AttnprobeError(f"{source} holds the evaluation needle '{needle['needle'][:60]}': remove it from the training text")


