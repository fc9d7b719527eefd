"""Offline English text: haystacks for needle tests, natural sequences for sink rates, held-out text for perplexity.

The default source is the Python documentation shipped with the standard library
(`pydoc_data.topics`), reduced to its prose paragraphs: grammar rules, code examples and headings
are dropped and each paragraph is reflowed onto one line. It needs no download and is the same on
every run of one Python version. A user text file can replace it (`path`).

The text is split in two halves at a paragraph break: haystacks and natural sequences come from
the first half, held-out perplexity text from the second, so a model is never scored on the text
that served as its haystack.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch

from attnprobe.hooks.errors import AttnprobeError

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
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AttnprobeError(f"text file {file} is not UTF-8 text (byte {error.start} cannot be decoded): "
                             "pass a UTF-8 text file") from None
    if "\x00" in text:
        raise AttnprobeError(f"text file {file} holds NUL bytes (a binary file?): pass a UTF-8 text file")
    text = text.strip()
    if not text:
        raise AttnprobeError(f"text file {file} is empty; pass a file with some English prose")
    return text


def prose(path: str | Path | None = None) -> str:
    """The whole source text: cleaned standard-library documentation, or the user's file as it is."""
    return _load(None if path is None else str(path))


def _halves(path) -> tuple[str, str]:
    text = prose(path)
    middle = text.find("\n", len(text) // 2)
    if middle < 0:  # one long line: split anywhere
        middle = len(text) // 2
    return text[:middle], text[middle:]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _tokens_from(tokenizer, text: str, n_tokens: int, what: str, fewer_ok: bool = False) -> list[int]:
    """At least `n_tokens` ids from the start of `text`, tokenizing only as much as needed (all of it, if
    the text is shorter and `fewer_ok`)."""
    chars = max(4 * n_tokens, 1000)
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= n_tokens or (fewer_ok and chars >= len(text)):
            return ids
        if chars >= len(text):
            raise AttnprobeError(f"the text holds only {len(ids)} tokens for {what} but {n_tokens} are needed; "
                                 "use a shorter length or a longer text file")
        chars *= 2


def haystack_ids(tokenizer, n_tokens: int, path=None, offset: int = 0) -> list[int]:
    """`n_tokens` token ids of haystack text, starting `offset` tokens into the first half (no BOS)."""
    first, _ = _halves(path)
    return _tokens_from(tokenizer, first, offset + n_tokens, "the haystack")[offset:offset + n_tokens]


def held_out_ids(tokenizer, n_tokens: int, path=None, fewer_ok: bool = False) -> list[int]:
    """`n_tokens` ids from the second half of the text, which haystacks never use (no BOS); fewer if the
    text is shorter and `fewer_ok`."""
    _, second = _halves(path)
    return _tokens_from(tokenizer, second.lstrip("\n"), n_tokens, "held-out text", fewer_ok)[:n_tokens]


def natural_sequences(tokenizer, n: int, length: int, path=None, seed: int = 0, fewer_ok: bool = False) -> torch.Tensor:
    """`n` distinct, non-overlapping windows of `length` tokens of natural text, (n, length), no BOS.

    Windows are cut from the first 2n windows' worth of text and `n` of them are drawn with `seed`. A
    shorter text gives every window it holds, fewer than `n`, if `fewer_ok` (at least one)."""
    first, _ = _halves(path)
    ids = _tokens_from(tokenizer, first, 2 * n * length, "natural sequences", fewer_ok)
    if len(ids) < length:
        raise AttnprobeError(f"the text holds only {len(ids)} tokens for natural sequences but one needs {length}; "
                             "use a shorter length or a longer text file")
    windows = torch.tensor(ids[: (len(ids) // length) * length]).view(-1, length)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return windows[order].long()


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
