"""Retrieval heads (Wu et al. 2024, arXiv 2404.15574): needle-in-a-haystack samples and copy-paste scores.

A sample is a haystack of `length` tokens with a needle sentence inserted at a depth (a fraction
0-1 of the haystack), moved back to the nearest sentence end as the model's own tokenizer splits
the text, then a question. The model answers greedily (at most 50 tokens, stopping at a newline or
EOS). At each decoding step that emits token w, head (l, h) copy-pastes when the key its last query
attends to most lies inside the needle's *answer* span and the prompt token there is w; each such
event adds 1 / |answer tokens| to the head's score for the sample.

As in the reference code (Wu et al.'s `retrieval_head_detection.py`), the span scored is the needle's
answer (their `real_needle`), each event adds 1 / |answer tokens|, the prompt minus its last token
is prefilled and decoding starts from that token, and a sample counts when ROUGE-1 recall of the
answer in the response exceeds 0.5. Differences, on purpose: the answer span is known exactly from
tokenizing the needle in pieces (the reference searches for a window whose token set overlaps the
answer's by > 90 %), sentence ends come from decoding with the model's tokenizer (the reference
hard-codes Llama's period ids), and decoding stops at a newline after text or an end-of-turn token
(the reference stops at Llama's newline id).

`teacher_forced_counts` adds a measure that does not need the model to answer: the correct answer is
fed after the prompt and each head's argmax on the copied token is counted the same way, so a model
that no longer recalls still shows which heads would retrieve.
"""
from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from contextlib import nullcontext
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import with_cache
from attnprobe.hooks.reducers import PatternStats, Reducer
from attnprobe.hooks.sites import Site

from . import texts
from .config import NEEDLES
from .mechanisms import Mechanism, Stage
from .rundir import read_json, readable, write_json, write_jsonl, write_parquet

DEFAULT_LENGTHS = (512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.5, 1.0)
DEFAULT_NEEDLES = 2
MAX_NEW_TOKENS = 50
ACCEPT_RECALL = 0.5
_PLACEHOLDER = "\x00CONTENT\x00"


# ---- needles and prompts ---------------------------------------------------------------------

def load_needles(path=None) -> list[dict]:
    """Needle/question/answer triples: the packaged set, or a JSON list of such objects at `path`."""
    try:
        if path is None:
            raw = resources.files("attnprobe.probe").joinpath(NEEDLES).read_text()
        else:
            with open(path) as handle:
                raw = handle.read()
        needles = json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise AttnprobeError(f"could not read needles from {path}: {exc}; pass a JSON list of {{needle, question, answer}}") from None
    for item in needles:
        if not {"needle", "question", "answer"} <= set(item) or item["answer"] not in item["needle"]:
            raise AttnprobeError(f"needle {item!r} needs 'needle', 'question' and an 'answer' that appears in the needle")
    return needles


def _choose_needles(needles) -> list[dict]:
    if needles is None:
        return load_needles()[:DEFAULT_NEEDLES]
    if isinstance(needles, int):
        available = load_needles()
        if not 1 <= needles <= len(available):
            raise AttnprobeError(f"asked for {needles} needles; choose 1-{len(available)}")
        return available[:needles]
    return list(needles)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def adds_bos(tokenizer) -> bool:
    """The tokenizer's own convention: does encoding plain text start with BOS?"""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and len(ids) > 0 and ids[0] == bos


def resolve_format(tokenizer, prompt_format: str) -> str:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    if prompt_format == "chat" and not has_template:
        raise AttnprobeError("this tokenizer has no chat template: use prompt_format='plain'")
    if prompt_format not in ("chat", "plain"):
        raise AttnprobeError(f"unknown prompt format '{prompt_format}': choose auto, chat or plain")
    return prompt_format


def wrap_prompt(tokenizer, body_ids: list[int], tail_text: str, prompt_format: str = "auto",
                bos: bool | None = None, reply: str = "") -> tuple[list[int], int]:
    """Ids of `body_ids` + `tail_text`, inside the chat template or plain; returns (ids, offset of the body).

    `reply` is where the answer starts: after the template's generation prompt, or, plain, on the
    line after `tail_text`.

    BOS: None keeps the tokenizer's convention, True adds one at the start unless the prompt already
    starts with it, False adds none. A chat template's own tokens are never removed: SmolLM2's
    template opens with <|im_start|>, which is also its BOS id, and stays with BOS off."""
    prompt_format = resolve_format(tokenizer, prompt_format)
    if prompt_format == "chat":
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False,
                                                 add_generation_prompt=True)
        head, tail = rendered.split(_PLACEHOLDER)
        head_ids, tail_ids = _encode(tokenizer, head), _encode(tokenizer, tail_text + tail + reply)
    else:
        head_ids, tail_ids = [], _encode(tokenizer, tail_text + ("\n" + reply if reply else ""))
        if bos is None:
            bos = adds_bos(tokenizer)
    bos_id = tokenizer.bos_token_id
    if bos and (not head_ids or head_ids[0] != bos_id):
        if bos_id is None:
            raise AttnprobeError("this tokenizer has no BOS token: run with BOS off")
        head_ids = [bos_id] + head_ids
    return head_ids + body_ids + tail_ids, len(head_ids)


def insertion_point(tokenizer, haystack: Sequence[int], depth: float) -> int:
    """Token index for a needle at `depth` (0-1), moved back to just after the nearest sentence end."""
    if not 0.0 <= depth <= 1.0:
        raise AttnprobeError(f"depth {depth} is outside 0-1: give depths as fractions of the haystack")
    target = round(depth * len(haystack))
    starts = [end + 1 for end in texts.sentence_boundaries(tokenizer, haystack) if end + 1 <= target]
    return max(starts, default=0)


def build_sample(tokenizer, haystack: Sequence[int], needle: dict, depth: float, prompt_format: str = "auto",
                 bos: bool | None = None) -> dict:
    """One NIAH prompt with the exact token spans of the needle and of its answer.

    The needle is tokenized in three pieces (before the answer, the answer, after it) so that the
    answer span is exact; pieces split at word starts, where BPE tokenizers split anyway."""
    haystack = [int(t) for t in haystack]
    insert = insertion_point(tokenizer, haystack, depth)
    before_piece = tokenizer.decode([haystack[insert - 1]]) if insert > 0 else "\n"
    after_piece = tokenizer.decode([haystack[insert]]) if insert < len(haystack) else " "
    lead = "" if before_piece[-1:].isspace() else " "
    trail = "" if after_piece[:1].isspace() else ("\n" if before_piece.endswith("\n") else " ")
    sentence, answer = needle["needle"], needle["answer"]
    at = sentence.index(answer)
    before, after = lead + sentence[:at], sentence[at + len(answer):] + trail
    if before.endswith(" "):  # the answer's leading space belongs to its first token
        before, answer = before[:-1], " " + answer
    before_ids, answer_ids, after_ids = (_encode(tokenizer, piece) for piece in (before, answer, after))
    needle_ids = before_ids + answer_ids + after_ids
    body = haystack[:insert] + needle_ids + haystack[insert:]
    question = f"\n\nQuestion: {needle['question']} Answer in a few words."
    if resolve_format(tokenizer, prompt_format) == "plain":
        question += "\nAnswer:"
    prompt, offset = wrap_prompt(tokenizer, body, question, prompt_format, bos)
    needle_start = offset + insert
    answer_start = needle_start + len(before_ids)
    return {
        "prompt_ids": prompt,
        "needle_span": [needle_start, needle_start + len(needle_ids)],
        "answer_span": [answer_start, answer_start + len(answer_ids)],
        "insert_depth": insert / max(len(haystack), 1),
        "needle": needle["needle"], "question": needle["question"], "answer": needle["answer"],
        "format": resolve_format(tokenizer, prompt_format), "bos": bool(prompt and prompt[0] == tokenizer.bos_token_id),
    }


# ---- decoding --------------------------------------------------------------------------------

def _stop_ids(tokenizer) -> set[int]:
    """EOS (and pad) ids, plus the end-of-turn tokens of common chat templates that the vocabulary has."""
    stops = set()
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        stops |= set(value) if isinstance(value, (list, tuple)) else ({value} if value is not None else set())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    stops |= {vocab[token] for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>") if token in vocab}
    return stops


@torch.no_grad()
def greedy_decode(model, prompt_ids: Sequence[int], max_new_tokens: int = MAX_NEW_TOKENS, stop_at_newline: bool = True,
                  prefill_context=None, decode_context=None, past: tuple[object, int] | None = None,
                  on_prefill: Callable[[object], None] | None = None) -> list[int]:
    """Greedy continuation of `prompt_ids` with a KV cache; stops at EOS/end of turn, or a newline after text.

    The prompt minus its last token is prefilled in `prefill_context`; every token-producing step
    (the first one feeds the prompt's last token) runs in `decode_context`. Both default to no
    context, so the caller's active `backend.patched(...)` edits apply throughout. `past` is
    (cache, n): a KV cache of the prompt's first n tokens to start from (it is consumed). `on_prefill` sees the
    cache of the prompt but its last token before decoding grows it."""
    if len(prompt_ids) + max_new_tokens > model.info.max_context > 0:
        raise AttnprobeError(f"prompt of {len(prompt_ids)} tokens plus {max_new_tokens} new ones exceeds the model's "
                             f"window of {model.info.max_context}; use a shorter length")
    tokenizer, device = model.tokenizer, model.device
    stops = _stop_ids(tokenizer)
    ids = torch.tensor([list(prompt_ids)], device=device)
    cache, done = past if past is not None else (None, 0)
    if ids.shape[1] - 1 > done:
        with prefill_context or nullcontext():
            cache = extend_cache(model, cache, ids[:, done:-1])
    if on_prefill is not None:
        on_prefill(cache)
    step_input, generated, text = ids[:, -1:], [], ""
    with decode_context or nullcontext():
        for _ in range(max_new_tokens):
            out, cache = with_cache(model.hf, cache, input_ids=step_input)
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            stop, text = _ends_answer(tokenizer, stops, token, text, stop_at_newline)
            if stop:
                break
            step_input = torch.tensor([[token]], device=device)
    return generated


def _ends_answer(tokenizer, stops: set[int], token: int, text: str, stop_at_newline: bool = True) -> tuple[bool, str]:
    """(whether `token` ends the answer, the answer text so far): EOS / end of turn, or a newline after text."""
    if token in stops:
        return True, text
    piece = tokenizer.decode([token])
    if stop_at_newline and "\n" in piece and (text + piece.split("\n")[0]).strip():
        return True, text
    return False, text + piece


def decode_with_reruns(model, backend, prompt_ids: Sequence[int], edits=(), max_new_tokens: int = MAX_NEW_TOKENS):
    """Greedy decoding through `backend.run` alone, re-running the whole sequence at each step (no KV cache).

    For backends that cannot keep reads on across HF calls (transformer-lens, nnsight): slower, same tokens.
    Returns (generated ids, argmax (steps, L, H) of each step's last query row)."""
    stops, ids, generated, text, steps = _stop_ids(model.tokenizer), list(prompt_ids), [], "", []
    for _ in range(max_new_tokens):
        reads = {(layer, Site.PATTERN): PatternStats(track_argmax=True) for layer in range(model.info.n_layers)}
        logits = backend.run(torch.tensor([ids]), reads=reads, edits=list(edits))
        steps.append(torch.stack([reads[(layer, Site.PATTERN)].argmax_steps[-1][0] for layer in range(model.info.n_layers)]))
        token = int(logits[0, -1].argmax())
        generated.append(token)
        ids.append(token)
        stop, text = _ends_answer(model.tokenizer, stops, token, text)
        if stop:
            break
    return generated, torch.stack(steps)


def extend_cache(model, cache, ids: torch.Tensor):
    """Feed `ids` (1, n) on top of `cache` (None: a new one) and return the cache; no logits are kept."""
    return with_cache(model.hf, cache, input_ids=ids, logits_to_keep=1)[1]


def answer_text(tokenizer, generated: Sequence[int]) -> str:
    """The response up to its first non-leading newline, without special tokens."""
    text = tokenizer.decode(list(generated), skip_special_tokens=True).strip()
    return text.split("\n")[0].strip()


# ---- scoring ---------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(response: str, reference: str) -> float:
    """ROUGE-1 recall: share of the reference's lowercase alphanumeric words found in the response (clipped counts)."""
    wanted = Counter(_words(reference))
    if not wanted:
        return 0.0
    found = Counter(_words(response))
    return sum(min(count, found[word]) for word, count in wanted.items()) / sum(wanted.values())


def accepted(response: str, answer: str) -> bool:
    return rouge1_recall(response, answer) > ACCEPT_RECALL


def copy_counts(argmax: torch.Tensor, generated: Sequence[int], prompt_ids: Sequence[int],
                answer_span: Sequence[int]) -> np.ndarray:
    """Copy-paste events per head, (L, H) ints.

    argmax[t, l, h] is the key position head (l, h) attended to most from the query that produced
    generated[t]; an event needs that key inside the answer span and the prompt token there to be
    generated[t]."""
    start, end = answer_span
    steps = min(argmax.shape[0], len(generated))
    keys = argmax[:steps].long()
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    inside = (keys >= start) & (keys < end)
    token_at_key = prompt[keys.clamp(max=len(prompt) - 1)]
    emitted = torch.as_tensor(list(generated[:steps]), dtype=torch.long).view(-1, 1, 1)
    return (inside & (token_at_key == emitted)).sum(dim=0).numpy()


class RowArgmax(Reducer):
    """The argmax key of chosen query rows of one layer's pattern: found[position] is (B, H)."""

    def __init__(self, positions: Sequence[int]) -> None:
        super().__init__()
        self.wanted = set(int(p) for p in positions)
        self.found: dict[int, torch.Tensor] = {}

    def _update(self, x, rows):
        n_rows, n_keys = x.shape[2], x.shape[3]
        rows = torch.arange(n_keys - n_rows, n_keys) if rows is None else rows.cpu()
        for index, position in enumerate(rows.tolist()):
            if position in self.wanted:
                self.found[position] = x[:, :, index].argmax(dim=-1).cpu()

    def result(self) -> dict[int, torch.Tensor]:
        return self.found


def teacher_forced_counts(backend, sample: dict, edits=(), past=None) -> np.ndarray:
    """Copy-paste events per head (L, H) with the correct answer fed instead of generated.

    One pass over prompt + answer[:-1]: the query that predicts answer token t is the prompt's last
    token for t = 0 and answer token t - 1 after it; an event is that query's argmax key inside the
    answer span holding answer token t, as in `copy_counts`. Needs no correct generation. With `past`, a
    KV cache of the prompt but its last token (made under `edits`; it is consumed), only those answer-predicting
    queries are computed: the same counts for a few tokens' cost instead of a whole prompt's patterns."""
    prompt = [int(t) for t in sample["prompt_ids"]]
    start, end = sample["answer_span"]
    answer = prompt[start:end]
    positions = [len(prompt) - 1 + t for t in range(len(answer))]
    n_layers = backend.info.n_layers
    reads = {(layer, Site.PATTERN): RowArgmax(positions) for layer in range(n_layers)}
    if past is None:
        backend.run(torch.tensor([prompt + answer[:-1]]), reads=reads, edits=list(edits))
    else:
        fed = torch.tensor([prompt[-1:] + answer[:-1]], device=backend.model.device)
        with torch.no_grad(), backend.patched(list(edits), reads):
            with_cache(backend.model.hf, past, input_ids=fed)
    argmax = torch.stack([torch.stack([reads[(layer, Site.PATTERN)].found[p][0] for layer in range(n_layers)])
                          for p in positions])
    return copy_counts(argmax, answer, prompt, sample["answer_span"])


def sample_scores(sample: dict, key: str = "copy_counts") -> np.ndarray:
    """Per-head retrieval score of one sample: copy events / answer tokens, (L, H)."""
    start, end = sample["answer_span"]
    return np.asarray(sample[key], dtype=float) / max(end - start, 1)


def heads_table(samples: list[dict], n_layers: int, n_heads: int, n_kv_heads: int | None = None) -> pd.DataFrame:
    """Per head: retrieval_score (mean over accepted samples), retrieval_activation (share of them
    copying >= 1 token) and teacher_forced_retrieval_score (mean over every sample, answer fed)."""
    kept = [sample_scores(s) for s in samples if s["accepted"]]
    if kept:
        stack = np.stack(kept)
        score, activation = stack.mean(axis=0), (stack > 0).mean(axis=0)
    else:  # no sample recalled its needle: the score is undefined, not zero
        score = activation = np.full((n_layers, n_heads), math.nan)
    forced = [sample_scores(s, "forced_copy_counts") for s in samples if "forced_copy_counts" in s]
    forced_score = np.stack(forced).mean(axis=0) if forced else np.full((n_layers, n_heads), math.nan)
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    table = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(),
                          "retrieval_score": score.ravel(), "retrieval_activation": activation.ravel(),
                          "teacher_forced_retrieval_score": forced_score.ravel()})
    if n_kv_heads:
        table["kv_head"] = table["head"] // (n_heads // n_kv_heads)
    return table


def retrieval_heads_json(samples_or_scores, n_layers: int | None = None, n_heads: int | None = None) -> dict:
    """{"layer-head": [score of each accepted sample]}, the reference code's retrieval_heads.json format.

    Takes the sample dicts of a census (only accepted ones count) or an array (samples, L, H) of scores."""
    if isinstance(samples_or_scores, (list, tuple)) and (not samples_or_scores or isinstance(samples_or_scores[0], dict)):
        scores = [sample_scores(s) for s in samples_or_scores if s["accepted"]]
        if scores:
            n_layers, n_heads = scores[0].shape
        elif n_layers is None or n_heads is None:
            raise AttnprobeError("no accepted samples: pass n_layers and n_heads to write empty score lists")
        stack = np.stack(scores) if scores else np.zeros((0, n_layers, n_heads))
    else:
        stack = np.asarray(samples_or_scores, dtype=float)
    return {f"{layer}-{head}": [float(v) for v in stack[:, layer, head]]
            for layer in range(stack.shape[1]) for head in range(stack.shape[2])}


# ---- the census ------------------------------------------------------------------------------

def sample_key(length: int, depth: float, needle_index: int) -> str:
    return f"len{length}-depth{round(depth * 100):03d}-needle{needle_index}"


def run_sample(model, backend, sample: dict, edits=(), max_new_tokens: int = MAX_NEW_TOKENS, past=None) -> dict:
    """Decode one built sample with last-row argmax reads on every layer; add generation, acceptance and copy counts."""
    n_layers = model.info.n_layers
    if not backend.keeps_edits_for_generation:
        generated, argmax = decode_with_reruns(model, backend, sample["prompt_ids"], edits, max_new_tokens)
        forced = teacher_forced_counts(backend, sample, edits)
    else:
        # unedited, the decoding's prefill also serves the teacher-forced pass (an edit may hold state the
        # decoding advances, so edited samples run their own pass)
        prefilled = []
        reads = {(layer, Site.PATTERN): PatternStats(track_argmax=True) for layer in range(n_layers)}
        generated = greedy_decode(model, sample["prompt_ids"], max_new_tokens, past=past,
                                  prefill_context=backend.patched(list(edits)),
                                  decode_context=backend.patched(list(edits), reads),
                                  on_prefill=None if edits else lambda cache: prefilled.append(copy.deepcopy(cache)))
        argmax = torch.stack([torch.stack(reads[(layer, Site.PATTERN)].argmax_steps)[:, 0] for layer in range(n_layers)], dim=1)
        forced = teacher_forced_counts(backend, sample, edits, past=prefilled[0] if prefilled else None)
    response = answer_text(model.tokenizer, generated)
    recall = rouge1_recall(response, sample["answer"])
    return {**sample, "generated_ids": generated, "generated_text": response, "rouge1_recall": recall,
            "accepted": recall > ACCEPT_RECALL,
            "copy_counts": copy_counts(argmax, generated, sample["prompt_ids"], sample["answer_span"]).tolist(),
            "forced_copy_counts": forced.tolist()}


class SharedPrefix:
    """One running KV cache over the common start of many prompts (template + haystack before the needle).

    Prompts come in order; each gets a copy of the running cache, grown to the point it shares with
    later prompts, so common text is prefilled once for the whole grid, not once per sample."""

    def __init__(self, model):
        self.model = model
        self.cache, self.ids = None, []

    @torch.no_grad()
    def upto(self, prompt_ids: Sequence[int], n: int) -> tuple[object, int]:
        """(copy of a cache of the prompt's first m tokens, m), with m >= n when the running cache already covers more."""
        prompt_ids = list(prompt_ids)
        covered = len(self.ids)
        if covered >= len(prompt_ids) or prompt_ids[:covered] != self.ids:
            self.cache, self.ids = None, []  # a different start: begin again
        if n > len(self.ids):
            self.cache = extend_cache(self.model, self.cache, torch.tensor([prompt_ids[len(self.ids):n]], device=self.model.device))
            self.ids = prompt_ids[:n]
        return copy.deepcopy(self.cache), len(self.ids)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _shared_plan(todo: list[dict]) -> list[tuple[dict, int]]:
    """Samples in prefill order, each with how far its prompt start is worth caching for the ones after it.

    Ordered by needle position, then needle, then length: haystack before the needle is shared across
    the grid, and at depth 0 one needle's prompts of growing length extend each other."""
    order = sorted(todo, key=lambda s: (s["needle_span"][0], s["needle_index"], s["length"]))
    plan = []
    for index, sample in enumerate(order):
        ids = sample["prompt_ids"]
        later = max((_common_prefix(ids, other["prompt_ids"]) for other in order[index + 1:]), default=0)
        plan.append((sample, min(max(later, sample["needle_span"][0]), len(ids) - 1)))
    return plan


def retrieval_census(model, backend, lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS,
                     needles=None, haystack=None, on_sample: Callable[[dict], None] | None = None,
                     done: dict | None = None, bos: bool | None = None, prompt_format: str = "auto",
                     edits=(), max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[pd.DataFrame, list[dict]]:
    """Retrieval scores of every head over a length x depth x needle grid.

    needles: None (the first two packaged ones), a count, or a list of {needle, question, answer}.
    haystack: path of a text file (default: the standard library's documentation prose).
    done: sample key -> finished sample dict, skipped (resume); on_sample(sample) sees each new one.
    edits: kept on during the whole sample (then no prefix is shared, since an edit may hold state).
    Returns (heads table [layer, head, retrieval_score, retrieval_activation, kv_head], samples in grid order)."""
    chosen = _choose_needles(needles)
    done = dict(done or {})
    hay = texts.haystack_ids(model.tokenizer, max(lengths), path=haystack)
    finished, todo = {}, []
    for length in lengths:
        for depth in depths:
            for index, needle in enumerate(chosen):
                key = sample_key(length, depth, index)
                if key in done:
                    finished[key] = done[key]
                    continue
                built = build_sample(model.tokenizer, hay[:length], needle, depth, prompt_format, bos)
                todo.append({"key": key, "length": length, "depth": depth, "needle_index": index, **built})
    # the shared prefix is prefilled by plain HF calls, outside any edits: only for an unedited model
    unedited = not edits and not backend.standing and backend.keeps_edits_for_generation
    prefix = SharedPrefix(model) if unedited else None
    for sample, shared in _shared_plan(todo):
        past = prefix.upto(sample["prompt_ids"], shared) if prefix is not None else None
        finished[sample["key"]] = result = run_sample(model, backend, sample, edits, max_new_tokens, past)
        if on_sample is not None:
            on_sample(result)
    samples = [finished[sample_key(length, depth, index)] for length in lengths for depth in depths
               for index in range(len(chosen))]
    info = model.info
    return heads_table(samples, info.n_layers, info.n_heads, info.n_kv_heads), samples


# ---- census declarations ----------------------------------------------------------------------

def _fitting_lengths(census, lengths: Sequence[int]) -> list[int]:
    """The NIAH lengths a short --haystack holds (the longest it can give, when it holds none), with a note."""
    start, end = texts.token_range(census.model.tokenizer, "census", census.config.haystack)
    fitting = [n for n in lengths if n <= end - start] or ([end - start] if end - start >= 16 else [])
    if not fitting:
        raise AttnprobeError(f"the haystack's census range holds only {end - start} tokens: pass a longer --haystack")
    if fitting != list(lengths):
        census.note(f"retrieval: the haystack holds {end - start} tokens, so NIAH lengths {fitting} were used, not {list(lengths)}")
    return fitting


def retrieval_stage(census) -> None:
    """The NIAH grid, every sample saved as it finishes (a rerun decodes only the missing ones)."""
    c, info = census.config, census.info
    sample_dir = census.run.shard("niah")
    done = {p.stem: read_json(p) for p in sample_dir.glob("*.json") if readable(p)}  # a damaged sample is decoded again
    lengths = _fitting_lengths(census, c.lengths)
    total = len(lengths) * len(c.depths) * c.needles

    def on_sample(sample: dict) -> None:
        write_json(sample_dir / f"{sample['key']}.json", sample)
        census.progress("retrieval", len(list(sample_dir.glob("*.json"))), total)

    heads, samples = retrieval_census(census.model, census.backend, lengths=lengths, depths=c.depths, needles=c.needles,
                                      haystack=c.haystack, bos=census.bos, on_sample=on_sample, done=done)
    write_jsonl(census.run / "niah_samples.jsonl", samples)
    write_json(census.run / "retrieval_heads.json", retrieval_heads_json(samples, info.n_layers, info.n_heads))
    write_parquet(census.run.shard("retrieval.parquet"), heads)


def _summary(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> str | None:
    if "retrieval_score" not in heads:
        return None
    if heads["retrieval_score"].isna().all():
        return "undefined: the model recalled no NIAH needle, so no sample counts"
    top = heads.dropna(subset=["retrieval_score"]).sort_values("retrieval_score", ascending=False).head(10)
    found = int((heads["retrieval_score"] > thresholds["retrieval"]).sum())
    zero = 100 * float((heads["retrieval_score"] == 0).mean())
    return (f"{found} of {len(heads)} score > {thresholds['retrieval']:g} ({zero:.0f} % score 0); top: "
            + ", ".join(f"{r.layer}.{r.head}={r.retrieval_score:.2f}" for r in top.itertuples()))


def _presence(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> dict:
    """The matrix's retrieval columns. The score needs samples the model answers: with none accepted
    it is undefined (NaN heads, presence None), and `retrieval_samples` says how many were; the
    teacher-forced count needs no correct answer, so a broken model still shows which heads would copy."""
    samples = [json.loads(line) for line in (run_dir / "niah_samples.jsonl").read_text().splitlines() if line.strip()]
    accepted = sum(1 for s in samples if s["accepted"])
    threshold = thresholds["retrieval"]
    found = int((heads["retrieval_score"] > threshold).sum())
    return {"retrieval_samples": accepted, "retrieval_samples_total": len(samples),
            "retrieval_heads": found if accepted else math.nan, "retrieval_present": found > 0 if accepted else None,
            "teacher_forced_retrieval_heads": int((heads["teacher_forced_retrieval_score"] > threshold).sum())}


CENSUS = (
    Stage("retrieval", retrieval_stage, order=70, shard="retrieval.parquet",
          columns=("retrieval_score", "retrieval_activation", "teacher_forced_retrieval_score"),
          files=("niah_samples.jsonl", "retrieval_heads.json"),
          description="retrieval heads from needle-in-a-haystack decoding, and teacher-forced copy scores"),
    Mechanism("retrieval", "retrieval", "retrieval heads", column="retrieval_score", threshold=0.1, letter="R", rank=10,
              panel="retrieval", summary=_summary, matrix="retrieval", matrix_label="retrieval heads", presence=_presence),
)
