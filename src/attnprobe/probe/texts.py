"""Offline English text: haystacks for needle tests, natural sequences for sink rates, held-out text for perplexity.

The default source is the Python documentation shipped with the standard library
(`pydoc_data.topics`), reduced to its prose paragraphs: grammar rules, code examples and headings
are dropped and each paragraph is reflowed onto one line. It needs no download and is the same on
every run of one Python version. A user text file can replace it (`path`).

The source is tokenized once and partitioned into disjoint named token ranges (`LAYOUT`): census
probes and ranking haystacks, evaluation haystacks, perplexity text and fitting text. Every consumer
takes its tokens through `take` (or a helper over it); a run inside `recording()` gets the token
offsets and source of everything it used, for its manifest.
"""
from __future__ import annotations

import hashlib
import platform
import re
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from attnprobe.errors import AttnprobeError

SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")
_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")


def _is_prose(paragraph: str) -> bool:
    """A reflowed paragraph that reads as sentences, not as code, a grammar rule or a list of names."""
    if len(paragraph) < 60 or not SENTENCE_END.search(paragraph):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return letters / len(paragraph) > 0.9 and not paragraph.startswith((">>>", "...", "*"))


def _paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines; indented blocks (code, grammar) and headings are left out."""
    kept = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or lines[0].startswith((" ", "\t")):
            continue
        if len(lines) >= 2 and _UNDERLINE.match(lines[-1].strip()):
            continue  # a heading with its underline
        kept.append(" ".join(" ".join(lines).split()))
    return kept


@lru_cache(maxsize=4)
def _load(path: str | None) -> str:
    if path is None:
        from pydoc_data import topics

        paragraphs = [p for key in sorted(topics.topics) for p in _paragraphs(topics.topics[key])]
        return "\n".join(p for p in paragraphs if _is_prose(p))
    file = Path(path).expanduser()
    if not file.is_file():
        raise AttnprobeError(f"text file not found: {file}; pass an existing UTF-8 text file or leave the path out")
    text = strict_text(file.read_bytes(), f"text file {file}").strip()
    if not text:
        raise AttnprobeError(f"text file {file} is empty; pass a file with some English prose")
    return text


def strict_text(data: bytes | str, where: str) -> str:
    """`data` as text, or one line refusing it: bytes that are not UTF-8, or NUL characters (a binary file)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise AttnprobeError(f"{where} is not UTF-8 text (byte {error.start} cannot be decoded): "
                                 "pass UTF-8 text") from None
    if "\x00" in data:
        raise AttnprobeError(f"{where} holds NUL bytes (a binary file?): pass UTF-8 text")
    return data


def prose(path: str | Path | None = None) -> str:
    """The whole source text: cleaned standard-library documentation, or the user's file as it is."""
    return _load(None if path is None else str(path))


# ---- the partition: every consumer takes its tokens from one named, disjoint range -------------

# Ranges in order along the tokenized source: (name, tokens, what it is for); the last takes the rest.
# A text too short for these sizes (a user's file) is cut in the same proportions; a user's file longer
# than they need grows them in proportion, so that its haystacks reach a long window (the embedded prose
# keeps these sizes, which every recorded run used).
# A model is never evaluated on text it was fitted on, and heads are never ranked and evaluated on
# the same haystack.
LAYOUT = (
    ("census", 10_000, "sink-rate sequences, prose probes, NIAH haystacks that rank retrieval heads"),
    ("evaluation", 8_192, "NIAH haystacks for evaluation (masking sweep, matrix)"),
    ("perplexity", 4_096, "held-out perplexity"),
    ("fit", None, "training text: attention transfer and any later conversion stage"),
)
RANGES = tuple(name for name, _, _ in LAYOUT)
_TOKENS: dict[tuple[int, str | None], tuple[object, list[int]]] = {}
_RECORDING: ContextVar[tuple[list, ...]] = ContextVar("attnprobe_text_recording", default=())


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def source_ids(tokenizer, path=None) -> list[int]:
    """The whole source tokenized once (no BOS); every range is a slice of it."""
    key = (id(tokenizer), None if path is None else str(path))
    cached = _TOKENS.get(key)
    if cached is None or cached[0] is not tokenizer:
        cached = _TOKENS[key] = (tokenizer, _encode(tokenizer, prose(path)))
    return cached[1]


@lru_cache(maxsize=4)
def source_name(path: str | None = None) -> str:
    """What the text is, with a hash: the pydoc prose differs between Python versions."""
    digest = hashlib.sha256(prose(path).encode()).hexdigest()[:16]
    where = f"pydoc_data (Python {platform.python_version()})" if path is None else str(Path(path).expanduser())
    return f"{where} sha256:{digest}"


def token_range(tokenizer, name: str, path=None) -> tuple[int, int]:
    """(start, end) token offsets of range `name` in the tokenized source."""
    if name not in RANGES:
        raise AttnprobeError(f"unknown text range '{name}': choose one of {', '.join(RANGES)}")
    total, start = len(source_ids(tokenizer, path)), 0
    fixed = sum(size for _, size, _ in LAYOUT if size is not None)
    scale = total / (1.25 * fixed)  # every range shrinks or grows alike; fit keeps a fifth
    if path is None:
        scale = min(1.0, scale)
    for range_name, size, _ in LAYOUT:
        end = total if size is None else min(start + int(size * scale), total)
        if range_name == name:
            return start, end
        start = end
    raise AssertionError(name)


def take(tokenizer, name: str, n_tokens: int, path=None, offset: int = 0, purpose: str = "") -> list[int]:
    """`n_tokens` ids of range `name`, from `offset` tokens into it (no BOS), recorded for the manifest."""
    start, end = token_range(tokenizer, name, path)
    if start + offset + n_tokens > end:
        raise AttnprobeError(f"the '{name}' text range holds {end - start} tokens but {offset + n_tokens} are needed "
                             f"for {purpose or name}; use shorter lengths or a longer text file")
    first = start + offset
    for log in _RECORDING.get():
        log.append({"purpose": purpose or name, "range": name, "source": source_name(None if path is None else str(path)),
                    "token_start": first, "token_end": first + n_tokens})
    return source_ids(tokenizer, path)[first:first + n_tokens]


@contextmanager
def recording() -> Iterator[list[dict]]:
    """Collect every `take` made inside the block as {purpose, range, source, token_start, token_end};
    a run writes them (`summarise`d) into its manifest. Blocks nest: each sees the takes inside it."""
    log: list[dict] = []
    token = _RECORDING.set(_RECORDING.get() + (log,))
    try:
        yield log
    finally:
        _RECORDING.reset(token)


def summarise(records: list[dict]) -> list[dict]:
    """Records merged per (purpose, range, source) into the span of tokens each purpose used."""
    merged: dict[tuple, dict] = {}
    for record in records:
        key = (record["purpose"], record["range"], record["source"])
        if key in merged:
            merged[key]["token_start"] = min(merged[key]["token_start"], record["token_start"])
            merged[key]["token_end"] = max(merged[key]["token_end"], record["token_end"])
        else:
            merged[key] = dict(record)
    return list(merged.values())


def haystack_ids(tokenizer, n_tokens: int, path=None, offset: int = 0, purpose: str = "ranking") -> list[int]:
    """`n_tokens` ids of haystack text (no BOS): from the census range to rank heads (`purpose`
    "ranking"), from the evaluation range to measure recall ("evaluation")."""
    if purpose not in ("ranking", "evaluation"):
        raise AttnprobeError(f"a haystack is for ranking or evaluation, not '{purpose}'")
    name = "census" if purpose == "ranking" else "evaluation"
    return take(tokenizer, name, n_tokens, path, offset, f"NIAH haystack ({purpose})")


def held_out_ids(tokenizer, n_tokens: int, path=None, fewer_ok: bool = False) -> list[int]:
    """`n_tokens` ids of the perplexity range, which nothing is fitted on or ranked with (no BOS); all
    the range holds, if fewer and `fewer_ok`."""
    if fewer_ok:
        start, end = token_range(tokenizer, "perplexity", path)
        n_tokens = min(n_tokens, end - start)
    return take(tokenizer, "perplexity", n_tokens, path, purpose="perplexity")


def fit_ids(tokenizer, n_tokens: int, path=None, offset: int = 0) -> list[int]:
    """`n_tokens` ids of the training range (no BOS): tokens used for training are never used for evaluation."""
    return take(tokenizer, "fit", n_tokens, path, offset, purpose="fit")


def with_bos(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(N, T) ids with BOS prepended to each row (unchanged when `bos_id` is None)."""
    if bos_id is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos_id, dtype=ids.dtype), ids], dim=1)


def windows(ids: list[int], length: int, bos_id: int | None = None) -> torch.Tensor:
    """`ids` cut into rows of `length` tokens; with `bos_id` a row is BOS + length - 1 text tokens,
    so rows are `length` long either way and every run of one BOS convention scores the same text."""
    body = length - (bos_id is not None)
    rows = torch.tensor(ids[: (len(ids) // body) * body], dtype=torch.long).view(-1, body)
    return with_bos(rows, bos_id)


def natural_sequences(tokenizer, n: int, length: int, path=None, seed: int = 0, bos_id: int | None = None,
                      purpose: str = "natural sequences", fewer_ok: bool = False) -> torch.Tensor:
    """`n` distinct, non-overlapping windows of natural text from the census range, (n, length).

    With `bos_id` a row is BOS + length - 1 text tokens: T counts BOS, as Gu et al. truncate to T.
    The census range is cut into windows and `n` of them are drawn with `seed`; a shorter text gives
    every window it holds (at least one) if `fewer_ok`."""
    start, end = token_range(tokenizer, "census", path)
    body = length - (bos_id is not None)
    available = (end - start) // body
    if available < n and not (fewer_ok and available >= 1):
        raise AttnprobeError(f"the census text range holds {available} windows of {body} tokens but {n} are needed "
                             f"for {purpose}; use fewer or shorter sequences or a longer text file")
    rows = torch.tensor(take(tokenizer, "census", available * body, path, purpose=purpose), dtype=torch.long).view(-1, body)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return with_bos(rows[order], bos_id)


def sentence_boundaries(tokenizer, ids) -> list[int]:
    """Indices of tokens that end a sentence, as the tokenizer itself decodes them.

    A sentence ends at a newline, or at '.', '!' or '?' (closing quotes allowed) followed by whitespace."""
    decoded: dict[int, str] = {}

    def text(token) -> str:
        token = int(token)
        if token not in decoded:
            decoded[token] = tokenizer.decode([token])
        return decoded[token]

    ends = []
    for index, token in enumerate(ids):
        piece = text(token)
        # punctuation ends a sentence only if whitespace follows: 'str.join' and '3.14' do not
        followed_by_space = index + 1 == len(ids) or text(ids[index + 1])[:1].isspace()
        if piece.endswith("\n") or (SENTENCE_END.search(piece) and followed_by_space):
            ends.append(index)
    return ends
