"""Recall tasks that measure what an intervention costs: passkey, needle-in-a-haystack, key-value
recall, copying a random token string, and held-out perplexity.

Every task calls the HF module directly, so it runs under whatever edits are active:

    with backend.patched(edits):
        table = passkey(model, variant="top-20 retrieval heads masked")

Each task is deterministic given its seed, stays inside the model's window and returns a tidy
DataFrame with the columns variant, task, length, depth, sample, correct (plus task-specific ones).
"""
from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from typing import Sequence

import pandas as pd
import torch

from attnprobe.hooks.errors import AttnprobeError
from attnprobe.probe import texts
from attnprobe.probe.retrieval import (accepted, answer_text, build_sample, greedy_decode, insertion_point,
                                       load_needles, wrap_prompt)

COLUMNS = ["variant", "task", "length", "depth", "sample", "correct"]
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.")


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


def niah(model, lengths: Sequence[int] = (512, 1024), depths: Sequence[float] = (0.0, 0.5, 1.0), needles: int = 2,
         variant: str = "base", haystack=None, bos: bool | None = None, prompt_format: str = "auto") -> pd.DataFrame:
    """Needle-in-a-haystack accuracy with the retrieval probe's samples; correct = ROUGE-1 recall of the answer > 0.5."""
    tokenizer, rows = model.tokenizer, []
    chosen = load_needles()[:needles]
    hay = texts.haystack_ids(tokenizer, max(lengths), path=haystack)
    for length in lengths:
        for depth in depths:
            for index, needle in enumerate(chosen):
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


def kv_recall(model, n_pairs: Sequence[int] = (4, 16, 64), samples: int = 8, seed: int = 0, variant: str = "base",
              bos: bool | None = None) -> pd.DataFrame:
    """Key-value recall: n lines 'word: 4-digit number', then one key again as a new line 'word:';
    correct if the first number generated is its value.

    `length` is the number of pairs, `depth` where the queried pair sits in the list (0-1)."""
    tokenizer, rows = model.tokenizer, []
    rng = random.Random(seed)
    for n in n_pairs:
        for sample in range(samples):
            keys = _key_words(n, rng)
            values = [str(v) for v in rng.sample(range(1000, 10000), n)]
            index = rng.randrange(n)
            lines = "".join(f"{k}: {v}\n" for k, v in zip(keys, values))
            body = _encode(tokenizer, "Remember these keys and values.\n" + lines)
            prompt, _ = wrap_prompt(tokenizer, body, f"{keys[index]}:", "plain", bos)
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


def copying(model, lengths: Sequence[int] = (8, 16, 32, 64), samples: int = 8, seed: int = 0, variant: str = "base",
            bos: bool | None = None) -> pd.DataFrame:
    """Copy a random token string: 'Repeat: <string>\\n<first token>' must continue with the rest of the string.

    Scored teacher-forced in one pass: the greedy continuation equals the string exactly when every
    next-token argmax over the copy is right (`correct`); `token_accuracy` is the share that is."""
    tokenizer, rows = model.tokenizer, []
    rng = random.Random(seed)
    candidates = copy_candidates(tokenizer)
    if len(candidates) < 2:
        raise AttnprobeError("the tokenizer has too few word tokens for the copying task")
    head = _encode(tokenizer, "Repeat: ")
    newline = _encode(tokenizer, "\n")
    for length in lengths:
        for sample in range(samples):
            string = [rng.choice(candidates) for _ in range(length)]
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


def perplexity(model, n_tokens: int = 2048, chunk: int = 512, variant: str = "base", bos: bool | None = None,
               path=None) -> pd.DataFrame:
    """Perplexity on held-out text (disjoint from the haystacks), in chunks of `chunk` tokens.

    One row per chunk: `tokens` scored, `nll` their summed loss, `perplexity` of the chunk. With BOS
    on, each chunk starts with BOS (never scored). Overall: exp(nll.sum() / tokens.sum())."""
    tokenizer = model.tokenizer
    ids = texts.held_out_ids(tokenizer, n_tokens, path=path)
    use_bos = bos if bos is not None else bool(model.info.tokenizer_adds_bos)
    if use_bos and tokenizer.bos_token_id is None:
        raise AttnprobeError("this tokenizer has no BOS token: run with BOS off")
    _fits(model, chunk + int(use_bos))
    rows = []
    for index, start in enumerate(range(0, len(ids) - 1, chunk)):
        piece = ids[start:start + chunk]
        prompt = ([tokenizer.bos_token_id] if use_bos else []) + piece
        with torch.no_grad():
            logits = model.hf(input_ids=torch.tensor([prompt], device=model.device), use_cache=False).logits[0].float()
        first = int(use_bos)  # predictions of the chunk's own tokens after the first
        targets = torch.tensor(piece[1:], device=logits.device)
        nll = float(torch.nn.functional.cross_entropy(logits[first:first + len(targets)], targets, reduction="sum"))
        rows.append({"variant": variant, "task": "perplexity", "chunk": index, "tokens": len(targets), "nll": nll,
                     "perplexity": math.exp(min(nll / max(len(targets), 1), 700))})
    return pd.DataFrame(rows, columns=["variant", "task", "chunk", "tokens", "nll", "perplexity"])


def overall_perplexity(table: pd.DataFrame) -> float:
    return math.exp(min(table["nll"].sum() / max(table["tokens"].sum(), 1), 700))
