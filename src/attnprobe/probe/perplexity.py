"""Perplexity of held-out text under whatever edits are given: the general-modelling check.

One function for every caller (the census's massive-activation intervention, the matrix, benchmarks),
so two tables that quote a perplexity of the same text quote the same number.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.edits import Edit

from . import texts
from .config import WINDOW  # tokens per scored row (BOS counted); one length, so census and matrix agree


def perplexity(backend: Backend, windows: torch.Tensor, edits: Sequence[Edit] = (), batch_size: int = 4,
               skip_first: int = 0) -> float:
    """exp(mean next-token loss) over the rows of `windows` (N, T); `skip_first` leading targets are not scored."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = backend.run(ids, edits=edits)[:, skip_first:-1]
        targets = ids[:, skip_first + 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total += float(loss)
        count += targets.numel()
    mean = total / max(count, 1)
    return math.inf if not math.isfinite(mean) or mean > 700 else math.exp(mean)


def held_out_windows(tokenizer, n_tokens: int, length: int = WINDOW, bos_id: int | None = None, path=None) -> torch.Tensor:
    """The perplexity range's first `n_tokens` as rows of `length` tokens (BOS + length - 1 with `bos_id`)."""
    return texts.windows(texts.held_out_ids(tokenizer, n_tokens, path=path), length, bos_id)


def held_out_perplexity(backend: Backend, n_tokens: int, length: int = WINDOW, bos_id: int | None = None,
                        edits: Sequence[Edit] = (), path=None) -> float:
    """Perplexity of the perplexity range's first `n_tokens` in rows of `length`. With BOS, the
    prediction made from BOS alone is not scored, so both conventions score text predicted from text."""
    rows = held_out_windows(backend.model.tokenizer, n_tokens, length, bos_id, path)
    return perplexity(backend, rows, edits, skip_first=int(bos_id is not None))
