"""Retrieval by needle patching: how much a head's reading of the needle carries the answer.

For a needle-in-a-haystack sample (retrieval.build_sample) a needle-free twin replaces the needle's
tokens by as many haystack tokens, so every position stays where it was. For head (l, h) the keys
and values its KV head holds at the needle's positions are replaced by the twin's (the needle's
hidden states at the head's input, nothing else), and the probability of the correct answer,
fed after the prompt (teacher forcing), is measured:

    needle_patch_drop = (P(answer) - P(answer | head patched)) / P(answer),   mean over samples.

Under GQA the patched keys and values are those of the head's KV head, but only head h's output is
taken from that run: its query heads are patched one at a time. The replacement runs through the
head's own kernel (a replaced head sees the patched keys and values like a softmax head does), so the
score is causal and comparable across kernels, beside the copy-paste score of `retrieval`, which
reads attention argmaxes. Heads that feed a retrieving head (a previous-token head whose output
forms its keys) score too: patching their input at the needle breaks the answer as well.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.edits import Edit
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site

from . import texts
from .mechanisms import Mechanism, Stage
from .retrieval import build_sample, load_needles
from .rundir import write_parquet


def needle_free(sample: dict, filler: list[int]) -> list[int]:
    """The sample's prompt with the needle's tokens replaced by the first tokens of `filler`."""
    start, end = sample["needle_span"]
    prompt = list(sample["prompt_ids"])
    return prompt[:start] + list(filler[: end - start]) + prompt[end:]


def answer_log_probability(logits: torch.Tensor, prompt_length: int, answer: list[int]) -> float:
    """log P(answer | prompt) from the logits of one prompt + answer[:-1] row (teacher forcing)."""
    rows = logits[0, prompt_length - 1:prompt_length - 1 + len(answer)].double().log_softmax(-1)
    return float(rows[torch.arange(len(answer)), torch.tensor(answer, device=rows.device)].sum())


def _replace_positions(layer: int, site: Site, kv_head: int, span: tuple[int, int], source: torch.Tensor) -> Edit:
    start, end = span

    def fn(tensor, call):
        tensor = tensor.clone()
        tensor[:, kv_head, start:end] = source[:, kv_head, start:end].to(tensor)
        return tensor

    return Edit(layer, site, fn, f"needle patch L{layer} KV{kv_head} {site.value}")


def _set_head(layer: int, head: int, z_head: torch.Tensor) -> Edit:
    def fn(z, call):
        z = z.clone()
        z[:, :, head] = z_head.to(z)
        return z

    return Edit(layer, Site.Z, fn, f"needle patch L{layer} H{head} z")


def patch_drops(backend: Backend, sample: dict, free_prompt: list[int]) -> tuple[float, torch.Tensor]:
    """(log P(answer), relative drop of P(answer) per head (L, H)) when each head reads the needle-free twin at
    the needle. The drop 1 - P_patched / P is taken from log probabilities, so it is defined however small P is."""
    info = backend.info
    prompt = [int(t) for t in sample["prompt_ids"]]
    start, end = sample["answer_span"]
    answer = prompt[start:end]
    ids, free_ids = torch.tensor([prompt + answer[:-1]]), torch.tensor([free_prompt + answer[:-1]])
    clean = answer_log_probability(backend.run(ids), len(prompt), answer)
    free = {(layer, site): Keep() for layer in range(info.n_layers) for site in (Site.K, Site.V)}
    backend.run(free_ids, reads=free)
    span = tuple(sample["needle_span"])
    group = info.n_heads // info.n_kv_heads
    drops = torch.zeros(info.n_layers, info.n_heads)
    for layer in range(info.n_layers):
        for kv_head in range(info.n_kv_heads):
            patch = [_replace_positions(layer, site, kv_head, span, free[(layer, site)].result()) for site in (Site.K, Site.V)]
            z = Keep()
            logits = backend.run(ids, reads={(layer, Site.Z): z}, edits=patch)
            for head in range(kv_head * group, (kv_head + 1) * group):
                if group > 1:  # only this query head's output comes from the patched run
                    logits = backend.run(ids, edits=[_set_head(layer, head, z.result()[:, :, head])])
                patched = answer_log_probability(logits, len(prompt), answer)
                drops[layer, head] = -torch.expm1(torch.tensor(patched - clean, dtype=torch.float64)).float()
    return clean, drops


# ---- census declarations ----------------------------------------------------------------------

def needle_patching_stage(census) -> None:
    """`needle_patch_samples` NIAH samples of the first NIAH length, at the census depths in turn."""
    c, info = census.config, census.info
    if not c.per_head_patching:
        census.note("needle patching: not measured (one pass per head and sample): --per-head-patching")
        write_parquet(census.run / "needle_patching.parquet", pd.DataFrame(columns=["sample", "depth", "layer", "head",
                                                                                    "answer_log_probability", "drop"]))
        nan = torch.full((info.n_layers, info.n_heads), float("nan"))
        write_parquet(census.run.shard("needle_patching.parquet"), census.per_head({"needle_patch_drop": nan}))
        return
    length = c.lengths[0]
    needles = load_needles()
    tokenizer = census.model.tokenizer
    longest = max(len(tokenizer(n["needle"], add_special_tokens=False).input_ids) for n in needles) + 8  # + the pieces' spaces
    hay = texts.haystack_ids(tokenizer, length + longest, path=c.haystack)
    rows, drops = [], []
    for index in range(c.needle_patch_samples):
        depth = c.depths[index % len(c.depths)]
        sample = build_sample(tokenizer, hay[:length], needles[index % len(needles)], depth, bos=census.bos)
        clean, drop = patch_drops(census.backend, sample, needle_free(sample, hay[length:]))
        drops.append(drop)
        rows += [{"sample": index, "depth": depth, "layer": layer, "head": head, "answer_log_probability": clean,
                  "drop": float(drop[layer, head])} for layer in range(info.n_layers) for head in range(info.n_heads)]
    write_parquet(census.run / "needle_patching.parquet", pd.DataFrame(rows))
    write_parquet(census.run.shard("needle_patching.parquet"),
                  census.per_head({"needle_patch_drop": torch.stack(drops).nanmean(dim=0)}))


def _summary(run_dir: Path, heads: pd.DataFrame, thresholds: dict) -> str | None:
    if "needle_patch_drop" not in heads or heads["needle_patch_drop"].isna().all():
        return None
    table = pd.read_parquet(run_dir / "needle_patching.parquet")
    probability = table.groupby("sample")["answer_log_probability"].first().apply(math.exp).mean()
    top = heads.dropna(subset=["needle_patch_drop"]).sort_values("needle_patch_drop", ascending=False)
    found = top[top["needle_patch_drop"] > thresholds["needle_patch"]]
    return (f"P(answer) {probability:.2f}; {len(found)} of {len(heads)} heads lose > {thresholds['needle_patch']:g} of it "
            "when they read a needle-free twin: " + ", ".join(f"{r.layer}.{r.head}={r.needle_patch_drop:.2f}"
                                                              for r in top.head(10).itertuples()))


CENSUS = (
    Stage("needle_patching", needle_patching_stage, order=75, shard="needle_patching.parquet", columns=("needle_patch_drop",),
          files=("needle_patching.parquet",),
          description="drop in answer probability when a head reads a needle-free twin at the needle's positions"),
    Mechanism("needle_patch", "needle_patching", "needle-patching heads", column="needle_patch_drop", threshold=0.5,
              letter="N", rank=15, panel="needle patch", summary=_summary),
)
