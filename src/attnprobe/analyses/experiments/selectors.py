"""Which heads stay exact: rankings of heads, or of KV heads, by competing selectors.

A ranking orders the *units* of a model best-first; keeping a budget of n units exact keeps the first n.
The unit is a KV head by default (`unit="kv"`): a KV head's cache is kept or dropped whole, so all its
query heads stay exact together (DuoAttention's granularity). `unit="head"` ranks query heads. A
head-level score becomes a KV-head score by the maximum over the KV head's query heads (one head that
needs the cache keeps it). On a model with one KV head per layer (Gemma-3-270M), KV-head selection
picks whole layers.

    retrieval   the census's retrieval score (Wu et al. 2024), from a run's heads.parquet
    razor       RazorAttention (arXiv 2407.15891): on repeated random tokens, echo = attention to the
                previous occurrence of the current token, induction = to the token after it; the
                paper keeps the top 14 % by induction plus the top 1 % by echo, so each budget's
                prefix takes echo and induction picks in that 1 : 14 proportion
    duo         DuoAttention (arXiv 2410.10819): one gate per layer and KV head, output =
                gate x full + (1 - gate) x streaming, trained on synthetic multi-passkey text to keep
                the final hidden states of the answer tokens, with an L1 penalty on the gates
    fit         attention-transfer fit error of the replacement kernel: heads it imitates worst stay exact
    random      a uniformly random order, one per seed
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from attnprobe.hooks.backends import Backend
from attnprobe.hooks.edits import Edit
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model, ModelInfo
from attnprobe.hooks.sites import Site
from attnprobe.kernels.registry import make_kernel
from attnprobe.probe import texts
from attnprobe.probe.head_types import induction_scores, repeated_random_tokens
from attnprobe.probe.rundir import census_heads

from attnprobe.analyses.experiments.config import SELECTORS, UNITS, DuoConfig  # noqa: F401 (re-exported: budget.py reads selectors.SELECTORS)
from attnprobe.analyses.experiments.selection import Head

RAZOR_ECHO_SHARE = 1 / 15  # 1 % echo beside 14 % induction heads
Unit = tuple[int, int]  # (layer, kv head) or (layer, head)


def unit_count(info: ModelInfo, unit: str) -> int:
    return info.n_layers * (info.n_kv_heads if unit == "kv" else info.n_heads)


def all_units(info: ModelInfo, unit: str) -> list[Unit]:
    per_layer = info.n_kv_heads if unit == "kv" else info.n_heads
    return [(layer, u) for layer in range(info.n_layers) for u in range(per_layer)]


def heads_of(info: ModelInfo, unit: str, units: Sequence[Unit]) -> set[Head]:
    """The query heads that the chosen units keep exact."""
    if unit == "head":
        return set(units)
    group = info.n_heads // info.n_kv_heads
    return {(layer, kv * group + g) for layer, kv in units for g in range(group)}


def to_units(info: ModelInfo, unit: str, scores: pd.DataFrame) -> pd.DataFrame:
    """Head scores (layer, head, score) as unit scores (layer, unit, score): KV heads take their heads' maximum."""
    if unit not in UNITS:
        raise AttnprobeError(f"unknown unit '{unit}': choose kv (KV heads, whose cache is kept whole) or head")
    table = scores.assign(unit=scores["head"] if unit == "head" else scores["head"] // (info.n_heads // info.n_kv_heads))
    return table.groupby(["layer", "unit"], as_index=False)["score"].max()


def order_by_score(scores: pd.DataFrame) -> list[Unit]:
    """Units best-first by score; ties (e.g. the many zero retrieval scores) broken by position."""
    table = scores.fillna({"score": float("-inf")}).sort_values(["score", "layer", "unit"], ascending=[False, True, True])
    return [(int(r.layer), int(r.unit)) for r in table.itertuples()]


def budget_count(fraction: float, n_units: int) -> int:
    """Units kept exact at a budget `fraction` of all units: at least 1, at most all."""
    if not 0 < fraction <= 1:
        raise AttnprobeError(f"a budget of {fraction} is not a share of heads: give fractions in (0, 1], e.g. 0.25")
    return min(n_units, max(1, round(fraction * n_units)))


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


# --- the selectors' scores -------------------------------------------------------------------------

def retrieval_scores(run_dir: Path | None, column: str = "retrieval_score") -> pd.DataFrame:
    heads = census_heads(run_dir, "the retrieval selector")
    if column not in heads:
        raise AttnprobeError(f"{Path(run_dir) / 'heads.parquet'} has no column '{column}': rerun the census with its retrieval stage")
    return heads[["layer", "head"]].assign(score=heads[column].astype(float))


def _head_frame(values: torch.Tensor) -> pd.DataFrame:
    layers, heads = values.shape
    return pd.DataFrame([{"layer": l, "head": h, "score": float(values[l, h])} for l in range(layers) for h in range(heads)])


def razor_scores(model: Model, backend: Backend, length: int = 50, batch: int = 10, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(induction, echo) head scores on `batch` random strings of `length` tokens repeated once."""
    bos = model.info.bos_id if model.info.tokenizer_adds_bos else None  # the census's convention
    ids = repeated_random_tokens(model.hf.config.vocab_size, length, batch, seed, bos)
    induction, echo = induction_scores(backend, ids.to(model.device), length)
    return _head_frame(induction), _head_frame(echo)


def razor_order(induction: pd.DataFrame, echo: pd.DataFrame, echo_share: float = RAZOR_ECHO_SHARE) -> list[Unit]:
    """Merge two unit orders so every prefix of length n holds round(n x echo_share) echo picks
    (RazorAttention's 14 % induction + 1 % echo at n = 15 % of heads)."""
    by_induction, by_echo = order_by_score(induction), order_by_score(echo)
    order, taken, echo_picks = [], set(), 0
    while len(order) < len(by_induction):
        want_echo = echo_picks < round((len(order) + 1) * echo_share)
        source = by_echo if want_echo else by_induction
        unit = next(u for u in source if u not in taken)
        echo_picks += want_echo
        order.append(unit)
        taken.add(unit)
    return order


def fit_errors(model: Model, backend: Backend, kernel: str, tokens: int = 1024, steps: int = 0, **options) -> pd.DataFrame:
    """Per-head MSE of `kernel` (fitted for `steps` Adam steps when it learns) against the softmax teacher,
    on the fit text range: a ranking never reads the perplexity text its cells are scored on."""
    from attnprobe.hooks.swap import fit_heads

    length = min(512, tokens)
    ids = torch.tensor(texts.fit_ids(model.tokenizer, tokens)[: max(1, tokens // length) * length]).view(-1, length)
    result = fit_heads(backend, ids.to(model.device), kernel, list(range(model.info.n_layers)), steps=steps, **options)
    return pd.DataFrame([{"layer": layer, "head": head, "score": loss} for layer in result.heads
                         for head, loss in zip(result.heads[layer], result.losses[layer])])


# --- DuoAttention's gates ------------------------------------------------------------------------

PASSKEY_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
                 "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
                 "victor", "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def duo_sample(tokenizer, haystack: Sequence[int], length: int, config: DuoConfig, rng: random.Random) -> tuple[list[int], list[int]]:
    """One training text in the released format: `passkeys` word passkeys at sorted random depths of
    `length` haystack tokens (from a random offset), then each question and its answer. Returns (ids,
    positions of the answers' tokens)."""
    def encode(text):
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    keys = [" ".join(rng.choice(PASSKEY_WORDS) for _ in range(config.passkey_words)) for _ in range(config.passkeys)]
    start = rng.randrange(max(1, len(haystack) - length))
    hay = list(haystack[start:start + length])
    depths = sorted(rng.uniform(0.05, 0.95) for _ in range(config.passkeys))
    ids, last = encode("This is a very long story book: <book> "), 0
    for i, (depth, key) in enumerate(zip(depths, keys)):
        at = int(len(hay) * depth)
        ids += hay[last:at] + encode(f"\n\nRemember this sequence of words, it's the {ORDINALS[i]} passkey to the vault: {key}\n\n")
        last = at
    ids += hay[last:] + encode(" </book>.\n\n")
    answers = []
    for i, key in enumerate(keys):
        ids += encode(f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\nPasskey:")
        answer = encode(" " + key)
        answers += range(len(ids), len(ids) + len(answer))
        ids += answer + encode("\n\n")
    return ids, answers


def gated_edits(model: Model, gates: torch.Tensor, sinks: int, window: int) -> list[Edit]:
    """Z edits mixing every head's softmax output with its sink + window output by its KV head's gate."""
    info = model.info
    group = info.n_heads // info.n_kv_heads
    streaming = make_kernel("sink+window", info.n_heads, info.head_dim, sinks=sinks, window=window, chunk=256).to(model.device)
    edits = []
    for layer in range(info.n_layers):
        def fn(z, call, layer=layer):
            k, v = call.repeated_kv()
            stream = streaming.forward(call.q, k, v, call.scaling).transpose(1, 2)  # (B, T, H, d)
            gate = gates[layer].clamp(0, 1).repeat_interleave(group)[None, None, :, None].to(z)
            return gate * z + (1 - gate) * stream.to(z)
        edits.append(Edit(layer, Site.Z, fn, f"duo gates L{layer}"))
    return edits


def duo_gates(model: Model, backend: Backend, config: DuoConfig | None = None,
              progress: Callable[[int, float], None] | None = None) -> pd.DataFrame:
    """Train the gates (layer, kv_head) and return them as a KV-head score table (layer, unit, score)."""
    info, config = model.info, config or DuoConfig()
    for length in config.lengths:
        if info.max_context and length + 200 > info.max_context:
            raise AttnprobeError(f"a DuoAttention training text of {length} tokens exceeds the model's window: use shorter lengths")
    rng = random.Random(config.seed)
    for parameter in model.hf.parameters():
        parameter.requires_grad_(False)
    gates = torch.ones(info.n_layers, info.n_kv_heads, device=model.device, requires_grad=True)
    optimizer = torch.optim.AdamW([gates], lr=config.lr, weight_decay=0.0)
    ramp = max(1, config.steps // 5)  # the released schedule: linear warm-up and decay over a fifth each, floor 0.1
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, max((s + 1) / ramp, 0.1), max((config.steps - s) / ramp, 0.1)))
    decoder = model.hf.get_decoder()
    haystack = texts.haystack_ids(model.tokenizer, 2 * max(config.lengths))
    edits = gated_edits(model, gates, config.sinks, config.window)
    for step in range(config.steps):
        with torch.no_grad():
            gates.clamp_(0, 1)
        ids, answers = duo_sample(model.tokenizer, haystack, config.lengths[step % len(config.lengths)], config, rng)
        ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            target = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, answers].float()
        with backend.patched(edits):
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, answers].float()
        distill = (hidden - target).pow(2).mean(dim=-1).mean()
        loss = distill + config.reg_weight * gates.abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress(step, float(distill.detach()))
    final = gates.detach().clamp(0, 1).cpu()
    return pd.DataFrame([{"layer": l, "unit": kv, "score": float(final[l, kv])}
                         for l in range(info.n_layers) for kv in range(info.n_kv_heads)])


def gates_as_heads(info: ModelInfo, gates: pd.DataFrame) -> pd.DataFrame:
    """A KV-head gate table as head scores (every query head takes its KV head's gate)."""
    group = info.n_heads // info.n_kv_heads
    return pd.DataFrame([{"layer": int(r.layer), "head": int(r.unit) * group + g, "score": r.score}
                         for r in gates.itertuples() for g in range(group)])


# --- all rankings --------------------------------------------------------------------------------

def random_order(info: ModelInfo, unit: str, seed: int) -> list[Unit]:
    return random.Random(seed).sample(all_units(info, unit), unit_count(info, unit))


def ranking_rows(selector: str, seed: int, order: Sequence[Unit], scores: pd.DataFrame | None) -> pd.DataFrame:
    """One row per unit: selector, seed, rank (0 = kept first), layer, unit, score."""
    lookup = {} if scores is None else {(int(r.layer), int(r.unit)): float(r.score) for r in scores.itertuples()}
    return pd.DataFrame([{"selector": selector, "seed": seed, "rank": i, "layer": layer, "unit": u,
                          "score": lookup.get((layer, u), float("nan"))} for i, (layer, u) in enumerate(order)])


def kept_units(rankings: pd.DataFrame, selector: str, seed: int, count: int) -> list[Unit]:
    chosen = rankings[(rankings["selector"] == selector) & (rankings["seed"] == seed)].sort_values("rank").head(count)
    return [(int(r.layer), int(r.unit)) for r in chosen.itertuples()]


def overlap_table(rankings: pd.DataFrame, budgets: Sequence[float], n_units: int) -> pd.DataFrame:
    """Jaccard overlap of every pair of (selector, seed) unit sets at each budget."""
    keys = sorted({(r.selector, int(r.seed)) for r in rankings[["selector", "seed"]].drop_duplicates().itertuples()})
    rows = []
    for fraction in budgets:
        count = budget_count(fraction, n_units)
        sets = {key: set(kept_units(rankings, *key, count)) for key in keys}
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                rows.append({"budget": fraction, "units": count, "selector_a": a[0], "seed_a": a[1],
                             "selector_b": b[0], "seed_b": b[1], "jaccard": jaccard(sets[a], sets[b])})
    return pd.DataFrame(rows, columns=["budget", "units", "selector_a", "seed_a", "selector_b", "seed_b", "jaccard"])
