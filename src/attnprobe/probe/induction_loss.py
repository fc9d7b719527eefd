"""Induction as behaviour: the in-context loss drop on repeated random tokens (Olsson et al. 2022).

A random string of P tokens followed by its exact repeat: a model that copies from context predicts
the second copy far better than the first. For each period P (50 to 1,024 by default)

    drop(P) = mean loss over the first copy's targets - mean loss over the second copy's (nats per token),

both over P - 1 targets (each copy's first token is left out: nothing in context predicts it). It
reads only the logits, so it compares any kernel, softmax, linear, delta-rule or hybrid heads alike,
where the attention-pattern induction score (head_types) reads attention rows, which a replaced head
has only as its effective attention. It is reported beside that score: induction_loss.parquet (one
row per period) and, per head, `induction_loss_share` at the first period that fits:

    induction_loss_share = 1 - drop(P | the head's output zeroed) / drop(P),

the share of the in-context gain that needs the head. The heads that feed the copying head score
too, as far as the gain goes without them (the planted model's previous-token head: about 0.13
when its copy head is softmax, which then attends evenly to the tokens it has seen; 1 when it is a
relu linear head, which all-zero keys leave with no output).
Tokens of a row are distinct when the vocabulary allows (as for the pattern score), else drawn
independently.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.edits import Edit, zero_heads

from .head_types import repeated_random_tokens
from .mechanisms import Mechanism, Stage
from .rundir import write_json, write_parquet
from .texts import with_bos

ROW_TOKENS = 8192  # tokens per forward pass (rows of long periods go a few at a time)


def repeated_tokens(vocab_size: int, period: int, batch: int, seed: int, bos_id: int | None) -> torch.Tensor:
    """(batch, [1 +] 2 * period) ids: a random string and its repeat; distinct tokens where the vocabulary has enough."""
    low = min(100, max(2, vocab_size - 2 * period))
    if vocab_size - low >= period:
        return repeated_random_tokens(vocab_size, period, batch, seed, bos_id)
    half = torch.randint(2, vocab_size, (batch, period), generator=torch.Generator().manual_seed(seed))
    return with_bos(torch.cat([half, half], dim=1), bos_id)


def copy_losses(backend: Backend, ids: torch.Tensor, period: int, edits: list[Edit] | tuple = ()) -> tuple[float, float]:
    """Mean next-token loss (nats) over the first copy's and the second copy's targets, each copy's first token left out."""
    offset = ids.shape[1] - 2 * period  # 1 when a BOS leads
    first = torch.arange(offset + 1, offset + period)  # target positions
    second = first + period
    per_pass = max(1, ROW_TOKENS // ids.shape[1])
    sums = torch.zeros(2, dtype=torch.float64)
    for start in range(0, ids.shape[0], per_pass):
        rows = ids[start:start + per_pass]
        logits = backend.run(rows, edits=list(edits)).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), rows[:, 1:].to(logits.device),
                                                 reduction="none").cpu()  # (B, T - 1): loss of target t + 1
        sums += torch.stack([loss[:, first - 1].sum(), loss[:, second - 1].sum()]).double()
    count = ids.shape[0] * (period - 1)
    return float(sums[0] / count), float(sums[1] / count)


def loss_drop_table(backend: Backend, vocab_size: int, periods: list[int], batch: int, seed: int,
                    bos_id: int | None) -> pd.DataFrame:
    """One row per period: loss on the first copy, on the second, and the drop between them."""
    rows = []
    for period in periods:
        ids = repeated_tokens(vocab_size, period, batch, seed, bos_id)
        first, second = copy_losses(backend, ids, period)
        rows.append({"period": period, "sequences": batch, "loss_first_copy": first, "loss_second_copy": second,
                     "loss_drop": first - second})
    return pd.DataFrame(rows, columns=["period", "sequences", "loss_first_copy", "loss_second_copy", "loss_drop"])


def head_shares(backend: Backend, ids: torch.Tensor, period: int) -> torch.Tensor:
    """(L, H) share of the in-context loss drop lost when each head's output is zeroed (NaN when there is no drop)."""
    info = backend.info
    first, second = copy_losses(backend, ids, period)
    drop = first - second
    shares = torch.full((info.n_layers, info.n_heads), float("nan"))
    if drop <= 0:
        return shares
    for layer in range(info.n_layers):
        for head in range(info.n_heads):
            ablated_first, ablated_second = copy_losses(backend, ids, period, [zero_heads(layer, head)])
            shares[layer, head] = 1 - (ablated_first - ablated_second) / drop
    return shares


# ---- census declarations ----------------------------------------------------------------------

def induction_loss_stage(census) -> None:
    c, info = census.config, census.info
    bos = info.bos_id if census.bos else None
    fits = [p for p in c.induction_periods if not info.max_context or 2 * p + 1 <= info.max_context]
    if len(fits) < len(c.induction_periods):
        census.note(f"induction loss: periods {sorted(set(c.induction_periods) - set(fits))} do not fit the model's "
                    f"window of {info.max_context} tokens twice, so they were left out")
    vocab = census.model.hf.config.vocab_size
    table = loss_drop_table(census.backend, vocab, fits, c.induction_loss_batch, c.seed, bos)
    write_parquet(census.run / "induction_loss.parquet", table)
    shares = torch.full((info.n_layers, info.n_heads), float("nan"))
    if fits and not c.per_head_patching:
        census.note("induction loss: each head's share of the drop was not measured (one pass per head): --per-head-patching")
    elif fits:
        shares = head_shares(census.backend, repeated_tokens(vocab, fits[0], c.induction_loss_batch, c.seed, bos), fits[0])
    write_json(census.run / "induction_loss.json", {"head_share_period": fits[0] if fits and c.per_head_patching else None,
                                                    "periods": fits, "bos": census.bos})
    write_parquet(census.run.shard("induction_loss.parquet"), census.per_head({"induction_loss_share": shares}))


def _summary(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> str | None:
    path = run_dir / "induction_loss.parquet"
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    if table.empty:
        return "no period fits the model's window"
    drops = ", ".join(f"P={r.period} {r.loss_drop:.2f}" for r in table.itertuples())
    needed = heads[heads["induction_loss_share"].fillna(-1) > thresholds["induction_loss"]] if "induction_loss_share" in heads else heads.iloc[:0]
    period = json.loads((run_dir / "induction_loss.json").read_text())["head_share_period"]
    if period is None:
        return f"loss drop on the repeat (nats/token): {drops}; heads' shares not measured (--per-head-patching)"
    return (f"loss drop on the repeat (nats/token): {drops}; heads carrying > {thresholds['induction_loss']:g} of it at P={period}: "
            + (", ".join(f"{r.layer}.{r.head}={r.induction_loss_share:.2f}" for r in needed.sort_values(
                "induction_loss_share", ascending=False).head(10).itertuples()) or "none"))


CENSUS = (
    Stage("induction_loss", induction_loss_stage, order=25, shard="induction_loss.parquet", columns=("induction_loss_share",),
          files=("induction_loss.parquet", "induction_loss.json"),
          description="in-context loss drop on repeated random tokens per period, and each head's share of it"),
    Mechanism("induction_loss", "induction_loss", "heads the in-context loss drop needs", column="induction_loss_share",
              threshold=0.5, letter="L", rank=25, panel="induction (loss share)", summary=_summary),
)
