"""Perplexity of held-out text under whatever edits are given: the general-modelling check."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.edits import Edit


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
