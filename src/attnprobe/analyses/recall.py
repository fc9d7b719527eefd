"""Recall tasks that measure what an intervention costs: passkey, needle-in-a-haystack, key-value
recall, copying a random token string, and held-out perplexity.

Every task calls the HF module directly, so it runs under whatever edits are active:

    with backend.patched(edits):
        table = passkey(model, variant="top-20 retrieval heads masked")

Each task is deterministic given its seed, stays inside the model's window and returns a tidy
DataFrame with the columns variant, task, length, depth, sample, correct (plus task-specific ones).

The tasks are sized to discriminate (the original SmolLM2 scores >= 0.8 on each at the matrix's sizes,
see README) and so that a sink+window hybrid cannot pass by construction: what must be recalled lies
at least `BEYOND_WINDOW` tokens before the query in key-value recall, and copying and passkey lengths
put the source outside the window too. Perplexity is `attnprobe.probe.perplexity`, one function for
census and matrix.
"""
from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from typing import Sequence

import pandas as pd
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.registry import make_kernel, names
from attnprobe.probe import texts
from attnprobe.probe.retrieval import (DEFAULT_NEEDLES, accepted, answer_text, build_sample, greedy_decode,
                                       insertion_point, load_needles, wrap_prompt)

COLUMNS = ["variant", "task", "length", "depth", "sample", "correct"]
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.")
# tokens a windowed hybrid keeps exact (sinks + window): what lies further back it cannot read
BEYOND_WINDOW = max(make_kernel(name, 1, 8).cached_tokens for name in names("hybrid"))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def _filler_ids(tokenizer, n_tokens: int) -> list[int]:
    unit = _encode(tokenizer, PASSKEY_FILLER)
    return (unit * (n_tokens // len(unit) + 1))[:n_tokens]


def _fits(model, n_tokens: int) -> None:
    window = model.info.max_context
    if window and n_tokens > window:
        raise AttnprobeError(f"a recall prompt of {n_tokens} tokens exceeds the model's window of {window}; use shorter lengths")


def passkey(model, lengths: Sequence[int] = (256, 512, 1024), depths: Sequence[float] = (0.0, 0.5, 1.0),
            samples: int = 1, seed: int = 0, variant: str = "base", bos: bool | None = None) -> pd.DataFrame:
    """Passkey retrieval: a 5-digit key hidden in repetitive filler of `length` tokens at `depth` (0-1).

    Plain completion format ('... The pass key is'); correct when the first number generated is the key."""
    tokenizer, rows = model.tokenizer, []
    rng = random.Random(seed)
    for length in lengths:
        filler = _filler_ids(tokenizer, length)
        for depth in depths:
            for sample in range(samples):
                key = str(rng.randint(10000, 99999))
                at = insertion_point(tokenizer, filler, depth)
                needle = _encode(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key.")
                body = _encode(tokenizer, PASSKEY_INTRO) + filler[:at] + needle + filler[at:]
                prompt, _ = wrap_prompt(tokenizer, body, "\nWhat is the pass key? The pass key is", "plain", bos)
                generated = greedy_decode(model, prompt, max_new_tokens=8)
                answer = _first_number(tokenizer.decode(generated, skip_special_tokens=True))
                rows.append({"variant": variant, "task": "passkey", "length": length, "depth": depth, "sample": sample,
                             "correct": answer == key, "answer": key, "response": answer or ""})
    return pd.DataFrame(rows, columns=COLUMNS + ["answer", "response"])


def evaluation_needles(used_for_ranking: int = DEFAULT_NEEDLES) -> list[int]:
    """Indices of the packaged needles a census that ranked heads with the first `used_for_ranking` never saw."""
    available = len(load_needles())
    if not 0 <= used_for_ranking < available:
        raise AttnprobeError(f"the census used {used_for_ranking} of the {available} packaged needles: none is left "
                             "for evaluation; rank heads with fewer needles (census --needles)")
    return list(range(used_for_ranking, available))


def niah(model, lengths: Sequence[int] = (512, 1024), depths: Sequence[float] = (0.0, 0.5, 1.0),
         needles: Sequence[int] | None = None, variant: str = "base", haystack=None, bos: bool | None = None,
         prompt_format: str = "auto", purpose: str = "evaluation") -> pd.DataFrame:
    """Needle-in-a-haystack accuracy with the retrieval probe's samples; correct = ROUGE-1 recall of the answer > 0.5.

    needles: indices into the packaged needles (default: those the default census does not rank with);
    `purpose` "evaluation" takes the haystack from the evaluation text range, disjoint from the census's.
    Prompts are built exactly as the census builds them (same builder, template and BOS rule)."""
    tokenizer, rows = model.tokenizer, []
    packaged = load_needles()
    indices = evaluation_needles() if needles is None else list(needles)
    hay = texts.haystack_ids(tokenizer, max(lengths), path=haystack, purpose=purpose)
    for length in lengths:
        for depth in depths:
            for index in indices:
                needle = packaged[index]
                sample = build_sample(tokenizer, hay[:length], needle, depth, prompt_format, bos)
                response = answer_text(tokenizer, greedy_decode(model, sample["prompt_ids"]))
                rows.append({"variant": variant, "task": "niah", "length": length, "depth": depth, "sample": index,
                             "correct": accepted(response, needle["answer"]), "answer": needle["answer"],
                             "response": response})
    return pd.DataFrame(rows, columns=COLUMNS + ["answer", "response"])


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,9}\b", texts.prose()))))


def _key_words(n: int, rng: random.Random) -> list[str]:
    """n distinct lowercase words from the offline prose, drawn with `rng`."""
    vocabulary = _vocabulary()
    if len(vocabulary) < n:
        raise AttnprobeError(f"only {len(vocabulary)} distinct words for {n} keys; use fewer pairs")
    return rng.sample(vocabulary, n)


def kv_recall(model, n_pairs: Sequence[int] = (16, 32, 64), samples: int = 8, seed: int = 0, variant: str = "base",
              bos: bool | None = None, beyond: int = BEYOND_WINDOW) -> pd.DataFrame:
    """Key-value recall: n lines 'word: 4-digit number', then 'Repeat the line of the key word.' and the
    answer started as 'word:'; correct if the first number generated is its value.

    The request is the user's turn of the chat template where the tokenizer has one (SmolLM2-135M
    answers 0.27 of bare 'word:' completions but about 0.9 of these, see README), plain text otherwise.
    The queried pair is drawn among those whose line ends at least `beyond` tokens before the
    request, so a windowed hybrid cannot read it from its window. `length` is the number of pairs,
    `depth` where the queried pair sits in the list (0-1)."""
    tokenizer, rows = model.tokenizer, []
    rng = random.Random(seed)
    intro = _encode(tokenizer, "Memorize this list of keys and values.\n")
    for n in n_pairs:
        for sample in range(samples):
            keys = _key_words(n, rng)
            values = [str(v) for v in rng.sample(range(1000, 10000), n)]
            lines = [_encode(tokenizer, f"{k}: {v}\n") for k, v in zip(keys, values)]
            body = intro + [t for line in lines for t in line]
            ends = [len(intro) + sum(map(len, lines[:i + 1])) for i in range(n)]
            far = [i for i, end in enumerate(ends) if len(body) - end >= beyond]
            if not far:
                raise AttnprobeError(f"{n} key-value pairs span fewer than {beyond} tokens: use more pairs (at least 16)")
            index = rng.choice(far)
            prompt, _ = wrap_prompt(tokenizer, body, f"\nRepeat the line of the key {keys[index]}.", "auto", bos,
                                    reply=f"{keys[index]}:")
            generated = greedy_decode(model, prompt, max_new_tokens=8)
            answer = _first_number(tokenizer.decode(generated, skip_special_tokens=True))
            rows.append({"variant": variant, "task": "kv_recall", "length": n, "depth": index / max(n - 1, 1),
                         "sample": sample, "correct": answer == values[index], "answer": values[index],
                         "response": answer or ""})
    return pd.DataFrame(rows, columns=COLUMNS + ["answer", "response"])


def copy_candidates(tokenizer, wanted: int = 1000) -> list[int]:
    """Token ids that decode to one alphabetic word and encode back to themselves.

    Scans ids in order and stops at `wanted` word tokens with a leading space (single letters or
    bare words are used only when a small vocabulary has too few)."""
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    spaced, bare = [], []
    for token in range(vocab_size):
        text = tokenizer.decode([token])
        word = text.strip()
        if not word.isascii() or not word.isalpha() or _encode(tokenizer, text) != [token]:
            continue
        (spaced if text.startswith(" ") and len(word) >= 3 else bare).append(token)
        if len(spaced) >= wanted:
            return spaced
    return spaced if len(spaced) >= 100 else spaced + bare


def copying(model, lengths: Sequence[int] = (64, 128), samples: int = 8, seed: int = 0, variant: str = "base",
            bos: bool | None = None) -> pd.DataFrame:
    """Copy a random token string: 'Repeat: <string>\\n<first token>' must continue with the rest of the string.

    Scored teacher-forced in one pass: `token_accuracy` is the share of next-token argmaxes over the
    copy that are right (the matrix's score); `correct` says every one is (greedy copying would be
    exact). Tokens are distinct within a string (while the candidates last) and never tokens of the
    instruction, so each copied token has one earlier occurrence to copy from."""
    tokenizer, rows = model.tokenizer, []
    rng = random.Random(seed)
    head = _encode(tokenizer, "Repeat: ")
    newline = _encode(tokenizer, "\n")
    candidates = [t for t in copy_candidates(tokenizer) if t not in head + newline]
    if len(candidates) < 2:
        raise AttnprobeError("the tokenizer has too few word tokens for the copying task")
    for length in lengths:
        for sample in range(samples):
            string = (rng.sample(candidates, length) if length <= len(candidates)
                      else [rng.choice(candidates) for _ in range(length)])
            body = head + string + newline + string
            prompt, offset = wrap_prompt(tokenizer, body, "", "plain", bos)
            _fits(model, len(prompt))
            with torch.no_grad():
                logits = model.hf(input_ids=torch.tensor([prompt], device=model.device), use_cache=False).logits[0]
            copy_start = offset + len(head) + length + len(newline)  # first token of the second copy
            predicted = logits[copy_start:copy_start + length - 1].argmax(dim=-1).cpu()
            hits = predicted == torch.tensor(string[1:])
            rows.append({"variant": variant, "task": "copying", "length": length, "depth": math.nan, "sample": sample,
                         "correct": bool(hits.all()), "token_accuracy": float(hits.float().mean())})
    return pd.DataFrame(rows, columns=COLUMNS + ["token_accuracy"])
