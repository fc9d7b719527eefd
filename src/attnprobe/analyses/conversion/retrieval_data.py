"""Synthetic retrieval documents for conversion training, built from pools the evaluation never draws from.

A converted model that never trains on text where something far back must be found again has no reason to
keep that skill (issue 42.1). These documents make it necessary, offline:

    passkey      a code hidden in prose, asked for at the end
    needle       a made-up fact hidden in prose, its question and answer at the end
    multi_query  several facts scattered through prose, every question and answer at the end
    kv           a list of 'key: value' lines filling the document, several lines asked for again
    copy         a string of words and numbers, then the same string again

The pools are disjoint from the evaluation's by construction, and `check_pools` proves it each time:

    numbers      6-digit values that are no evaluation item: recall.py's passkeys are 5-digit, its key-value
                 values 4-digit; analyses/tasks/pools.py, where present, sides every item by a hash and the
                 documents take training-side ones only
    words        made-up consonant-vowel words (or a word list file) with every evaluation item removed;
                 recall.py's keys are the prose's own words
    needles      templates over those words and numbers, never a packaged needle (all of those evaluate)
    haystack     the prose's 'fit' range (texts.LAYOUT), never the census, evaluation or perplexity range

Documents are exactly `length` tokens (BOS first where the tokenizer adds one), so they mix into the
conversion's training windows (`mix_retrieval`) at a stated fraction of stage 1, stage 2 or both.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from attnprobe.errors import AttnprobeError

KINDS = ("passkey", "needle", "multi_query", "kv", "copy")
STAGES = ("1", "2", "both")
TRAINING_NUMBERS = range(100_000, 1_000_000)
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
QUERIES = 4  # questions per kv and multi_query document
NEEDLE_TEMPLATES = (  # (needle, question, answer field): none is a packaged needle's sentence
    ("The {a} beacon on {b} hill signals the number {n}.", "What number does the {a} beacon on {b} hill signal?", "n"),
    ("The courier from {a} carries a parcel marked {b}.", "What mark is on the parcel the courier from {a} carries?", "b"),
    ("In the village of {a} the well is guarded by a goat called {b}.", "What is the goat that guards the well of {a} called?", "b"),
    ("The ledger of the {a} guild ends with the entry {n}.", "With which entry does the ledger of the {a} guild end?", "n"),
)


@dataclass
class RetrievalMix:
    """Synthetic retrieval documents mixed into the conversion's training windows."""

    fraction: float = field(default=0.0, metadata={"help": "share of training windows that are synthetic retrieval documents (0-1)"})
    stages: str = field(default="2", metadata={"help": "which conversion stages get them: 1, 2 or both"})
    kinds: tuple[str, ...] = field(default=KINDS, metadata={"help": "document kinds: passkey, needle, multi_query, kv, copy"})
    words: Optional[str] = field(default=None, metadata={"help": "word list file for keys and answers (one word a line; "
                                                                 "default: made-up words); it must hold no evaluation word"})

    def check(self, length: int, window: int | None) -> None:
        if not 0 <= self.fraction <= 1:
            raise AttnprobeError(f"a retrieval fraction of {self.fraction} is not a share: give 0-1, e.g. 0.2")
        if self.stages not in STAGES:
            raise AttnprobeError(f"retrieval stages '{self.stages}': choose 1, 2 or both")
        unknown = sorted(set(self.kinds) - set(KINDS)) or ([] if self.kinds else ["none"])
        if unknown:
            raise AttnprobeError(f"unknown retrieval kind(s) {', '.join(unknown)}: choose from {', '.join(KINDS)}")
        if window and length > window:
            raise AttnprobeError(f"retrieval documents of {length} tokens exceed the model's window of {window}: use a shorter --length")


# ---- the pools ----------------------------------------------------------------------------------------------


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


# ---- documents ----------------------------------------------------------------------------------------------


@dataclass
class Document:
    ids: list[int]
    answers: list[tuple[int, int]]  # token spans [start, stop) of the answers after their questions
    answer_texts: list[str]


class Builder:
    """Documents of one tokenizer, from the training pools and a haystack of token ids."""

    def __init__(self, tokenizer, haystack: Sequence[int], bos: Sequence[int], words: Sequence[str],
                 is_item: Callable[[str], bool] = lambda item: False) -> None:
        self.tokenizer, self.haystack, self.bos, self.words = tokenizer, list(haystack), list(bos), list(words)
        self.is_item = is_item  # the evaluation's rule: a number it may ask for is drawn again
        self.drawn: set[str] = set()  # every number taught, for `assert_training_items`
        self.encoded: dict[str, list[int]] = {}  # a key or number is tokenized once
        if len(self.haystack) < 64:
            raise AttnprobeError(f"the training prose holds {len(self.haystack)} tokens: too few for a haystack")

    def encode(self, text: str) -> list[int]:
        if text not in self.encoded:
            self.encoded[text] = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return self.encoded[text]

    def prose(self, n: int, rng: random.Random) -> list[int]:
        """n haystack tokens from a random offset, wrapping around the range."""
        start = rng.randrange(len(self.haystack))
        return [self.haystack[(start + i) % len(self.haystack)] for i in range(n)]

    def number(self, rng: random.Random) -> str:
        while True:
            number = str(rng.choice(TRAINING_NUMBERS))
            if not self.is_item(number):
                self.drawn.add(number)
                return number

    def fact(self, rng: random.Random) -> tuple[str, str, str]:
        needle, question, field_name = rng.choice(NEEDLE_TEMPLATES)
        a, b = rng.sample(self.words, 2)
        values = {"a": a, "b": b.capitalize(), "n": self.number(rng)}
        return needle.format(**values), question.format(**values), values[field_name]

    def finish(self, inserts: list[list[int]], tail: list[tuple[str, str]], length: int, rng: random.Random,
               body: Sequence[int] = ()) -> Document:
        """BOS + prose with `inserts` at random depths + `body` + each (question, answer) of `tail`, `length` tokens."""
        tail_ids, spans = [], []
        for question, answer in tail:
            tail_ids += self.encode(question)
            answer_ids = self.encode(" " + answer)
            spans.append((len(tail_ids), len(tail_ids) + len(answer_ids)))
            tail_ids += answer_ids + self.encode("\n")
        fill = length - len(self.bos) - len(body) - sum(map(len, inserts)) - len(tail_ids)
        if fill < 0:
            raise AttnprobeError(f"a retrieval document needs {length - fill} tokens but the windows hold {length}: "
                                 "use a longer --length (2K-8K tokens)")
        hay = self.prose(fill, rng)
        cuts = sorted(rng.randrange(len(hay) + 1) for _ in inserts)
        ids, last = list(self.bos), 0
        for cut, insert in zip(cuts, inserts):
            ids += hay[last:cut] + insert
            last = cut
        ids += hay[last:] + list(body)
        offset = len(ids)
        return Document(ids + tail_ids, [(offset + a, offset + b) for a, b in spans], [answer for _, answer in tail])

    def passkey(self, length: int, rng: random.Random) -> Document:
        code = self.number(rng)
        insert = self.encode(f" The vault code is {code}. Keep it in mind: {code} opens the vault. ")
        return self.finish([insert], [("\nWhat is the vault code? The vault code is", code)], length, rng)

    def needles(self, length: int, rng: random.Random, count: int) -> Document:
        facts = [self.fact(rng) for _ in range(count)]
        inserts = [self.encode(f" {needle} ") for needle, _, _ in facts]
        tail = [(f"\nQuestion: {question}\nAnswer:", answer) for _, question, answer in rng.sample(facts, len(facts))]
        return self.finish(inserts, tail, length, rng)

    def kv(self, length: int, rng: random.Random) -> Document:
        intro = self.encode("Memorise these codes.\n")
        word = max(self.words[:4096], key=len)
        longest = self.encode(f"\nWhich code has the key {word}?\n{word}: {TRAINING_NUMBERS.stop - 1}\n")
        budget = length - len(self.bos) - QUERIES * len(longest)  # room for the questions
        values, body = {}, list(intro)
        for key in rng.sample(self.words, max(0, min(len(self.words), budget))):
            value = self.number(rng)
            line = self.encode(f"{key}: ") + self.encode(f"{value}\n")
            if len(body) + len(line) > budget:
                break
            values[key] = value
            body += line
        keys = list(values)
        if len(keys) < QUERIES:
            raise AttnprobeError(f"{length} tokens hold too few key-value lines: use a longer --length (2K-8K tokens)")
        asked = rng.sample(keys[: max(QUERIES, len(keys) * 3 // 4)], QUERIES)  # the last lines sit in any window
        return self.finish([], [(f"\nWhich code has the key {key}?\n{key}:", values[key]) for key in asked], length, rng, body)

    def copy(self, length: int, rng: random.Random) -> Document:
        head, newline = self.encode("Repeat the list exactly:\n"), self.encode("\n")
        budget = (length - len(self.bos) - len(head) - 2 * len(newline)) // 2
        string: list[int] = []
        while True:
            item = self.number(rng) if rng.random() < 0.25 else rng.choice(self.words)
            piece = self.encode(" " + item)
            if len(string) + len(piece) > budget:
                break
            string += piece
        if len(string) < 16:
            raise AttnprobeError(f"{length} tokens hold too short a string to copy: use a longer --length (2K-8K tokens)")
        start = length - (len(head) + 2 * len(string) + 2 * len(newline)) - len(self.bos)
        ids = self.bos + self.prose(start, rng) + head + string + newline + string + newline
        copied = len(ids) - len(newline) - len(string)
        return Document(ids, [(copied, copied + len(string))], [self.tokenizer.decode(string)])

    def document(self, kind: str, length: int, rng: random.Random) -> Document:
        if kind == "passkey":
            return self.passkey(length, rng)
        if kind in ("needle", "multi_query"):
            return self.needles(length, rng, 1 if kind == "needle" else QUERIES)
        if kind == "kv":
            return self.kv(length, rng)
        if kind == "copy":
            return self.copy(length, rng)
        raise AttnprobeError(f"unknown retrieval kind '{kind}': choose from {', '.join(KINDS)}")


def builder(model, words_file: str | None = None) -> Builder:
    """A Builder for `model` after checking the pools against the evaluation's (one line and exit 2 if they meet)."""
    from attnprobe.analyses.conversion.data import _bos, training_prose_ids

    evaluation = evaluation_pools()
    pools = training_pools(words_file, evaluation)
    check_pools(pools, evaluation)
    return Builder(model.tokenizer, training_prose_ids(model), _bos(model), pools["words"], evaluation["is_item"])


def mix_retrieval(model, data, mix: RetrievalMix, transfer_windows: int, e2e_windows: int, seed: int = 0):
    """`data` with `mix.fraction` of the windows of the chosen stages replaced by retrieval documents (drawn with
    `seed`). Stage 1 trains on windows [0, transfer_windows), stage 2 on the next `e2e_windows` (`train.convert`'s order)."""
    from attnprobe.analyses.conversion.data import TrainingData

    length = data.windows.shape[1]
    mix.check(length, model.info.max_context)
    if mix.fraction == 0:
        return data
    spans = {"1": [(0, transfer_windows)], "2": [(transfer_windows, transfer_windows + e2e_windows)],
             "both": [(0, transfer_windows + e2e_windows)]}[mix.stages]
    generator = torch.Generator().manual_seed(seed)
    positions = sorted(start + int(i) for start, stop in spans
                       for i in torch.randperm(stop - start, generator=generator)[: round(mix.fraction * (stop - start))])
    make, rng = builder(model, mix.words), random.Random(seed)
    windows, counts = data.windows.clone(), dict.fromkeys(mix.kinds, 0)
    for index, position in enumerate(positions):
        kind = mix.kinds[index % len(mix.kinds)]
        windows[position] = torch.tensor(make.document(kind, length, rng).ids)
        counts[kind] += 1
    assert_training_items(sorted(make.drawn))
    digest = hashlib.sha256(windows.to(torch.int32).numpy().tobytes()).hexdigest()
    described = {**data.description, "sha256": digest,
                 "retrieval": {"fraction": mix.fraction, "stages": mix.stages, "documents": counts, "seed": seed,
                               "words": mix.words or "made-up", "numbers": [TRAINING_NUMBERS.start, TRAINING_NUMBERS.stop],
                               "haystack": "fit range"}}
    return TrainingData(windows, described)
