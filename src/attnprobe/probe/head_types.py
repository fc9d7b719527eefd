"""Cheap head types: previous-token, induction and duplicate-token scores (TransformerLens conventions).

Induction input: random tokens R of length S repeated twice (batch >= 10). The induction score is the
mean attention from position i to i - S + 1 over the second copy; duplicate-token is the mean
attention from i to i - S (the earlier copy of the same token). Previous-token is mean_i A[i, i-1]
on natural text (computed by `sinks.sink_scan`).
"""
from __future__ import annotations

import torch

from attnprobe.hooks.backends import Backend
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import check_ids

from .mechanisms import Mechanism, Stage
from .patterns import diagonal_by_layer, pattern_stats
from .rundir import write_parquet
from .texts import with_bos


def repeated_random_tokens(vocab_size: int, length: int = 50, batch: int = 10, seed: int = 0,
                           bos_id: int | None = None, low: int = 100) -> torch.Tensor:
    """(batch, [1 +] 2 * length) ids: a random string and its exact repeat, optionally after BOS.

    Tokens are drawn without replacement within a row, so each position of the second copy has one
    induction target. Ids below `low` are avoided: small ids are special or byte tokens in most
    tokenizers."""
    generator = torch.Generator().manual_seed(seed)
    low = min(low, max(2, vocab_size - 2 * length))
    if vocab_size - low < length:
        raise AttnprobeError(f"a vocabulary of {vocab_size} cannot give {length} distinct tokens: use a smaller --induction-length")
    half = torch.stack([torch.randperm(vocab_size - low, generator=generator)[:length] + low for _ in range(batch)])
    return with_bos(torch.cat([half, half], dim=1), bos_id)


def induction_scores(backend: Backend, ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(induction, duplicate) scores (L, H) over the second copy of a repeated random string."""
    ids = check_ids(backend.info, ids)
    offset = ids.shape[1] - 2 * length  # 1 when a BOS leads
    stats = pattern_stats(backend, ids, diagonals=(length - 1, length), diagonal_start=offset + length)
    return diagonal_by_layer(stats, length - 1), diagonal_by_layer(stats, length)


def induction_stage(census) -> None:
    c = census.config
    ids = repeated_random_tokens(census.model.hf.config.vocab_size, c.induction_length, c.induction_batch, c.seed,
                                 census.info.bos_id if census.bos else None)
    induction, duplicate = induction_scores(census.backend, ids, c.induction_length)
    write_parquet(census.run.shard("induction.parquet"), census.per_head({"induction_score": induction, "duplicate_score": duplicate}))


CENSUS = (
    Stage("induction", induction_stage, order=20, shard="induction.parquet", columns=("induction_score", "duplicate_score"),
          description="induction and duplicate-token scores on repeated random strings"),
    Mechanism("induction", "induction", "induction heads", column="induction_score", threshold=0.4, letter="I", rank=20,
              panel="induction", matrix="induction", matrix_label="induction heads"),
    Mechanism("duplicate", "induction", "duplicate-token heads", column="duplicate_score", threshold=0.4, letter="D",
              rank=40, panel="duplicate"),
)
