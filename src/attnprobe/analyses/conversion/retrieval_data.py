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
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from attnprobe.errors import AttnprobeError

from attnprobe.analyses.conversion.pools import (NEEDLE_TEMPLATES, TRAINING_NUMBERS, assert_training_items, check_pools,
                                                 evaluation_pools, training_pools)

KINDS = ("passkey", "needle", "multi_query", "kv", "copy")
STAGES = ("1", "2", "both")
QUERIES = 4  # questions per kv and multi_query document


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
        budget = length - len(self.bos) - QUERIES * len(longest)  # room for the questions, about
        values, lines, used = {}, [], len(intro)
        for key in rng.sample(self.words, max(0, min(len(self.words), budget))):
            value = self.number(rng)
            line = self.encode(f"{key}: ") + self.encode(f"{value}\n")
            if used + len(line) > budget:
                break
            values[key] = value
            lines.append((key, line))
            used += len(line)
        keys = list(values)
        if len(keys) < QUERIES:
            raise AttnprobeError(f"{length} tokens hold too few key-value lines: use a longer --length (2K-8K tokens)")
        asked = rng.sample(keys[: max(QUERIES, len(keys) * 3 // 4)], QUERIES)  # the last lines sit in any window
        tail = [(f"\nWhich code has the key {key}?\n{key}:", values[key]) for key in asked]
        # the questions as `finish` encodes them (question, answer and newline apart) can outgrow the estimate by
        # a few tokens: drop the last lines that are not asked until the document fits
        needed = len(self.bos) + used + sum(len(self.encode(q)) + len(self.encode(" " + a)) + len(self.encode("\n"))
                                            for q, a in tail)
        while needed > length and lines and lines[-1][0] not in asked:
            needed -= len(lines.pop()[1])
        body = list(intro) + [token for _, line in lines for token in line]
        return self.finish([], tail, length, rng, body)

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
