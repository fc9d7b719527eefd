"""Head-level hybrid conversion (issue 43): a selector ranks KV heads, a budget of them keeps exact softmax
(every query head of a kept KV head, so its cache is kept whole under GQA) and every other head converts to
one family. The selectors (all rank KV heads, best first):

    retrieval       the census's retrieval score (heads.parquet of a census of this model)
    teacher-forced  the census's teacher-forced retrieval score (the answer fed, so no correct answer needed)
    ablation        the drop in key-value recall (mean log-probability of the answers, teacher-forced) when
                    that KV head is masked, on synthetic key-value documents of the training pools
                    (`retrieval_data`), never on evaluation text
    duo             DuoAttention's trained gates (experiments/selectors.py): one gate per KV head mixing full attention
                    with a streaming one, trained on synthetic passkeys of `probe_length` tokens with an L1 push to zero
    kl-layers       layer i kept softmax and every other head converted, a short two-stage conversion each:
                    layers ranked by the KL to the teacher they gain over converting every layer
    uniform-layers  the layer baseline: whole layers evenly spaced, as many KV heads as the budget
    random          a uniformly random order (`draw` picks one; the overlap table takes `draws` of them)
    razor           RazorAttention's echo and induction scores (experiments/selectors.py)

`overlap_by_budget` gives the Jaccard overlap of the selectors' sets per budget in the columns of budget.py's
overlap.parquet (`selectors.overlap_table`); a run writes it for its selector beside the cheap ones (`write_overlap`).
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.edits import zero_heads
from attnprobe.hooks.model import Model, ModelInfo
from attnprobe.probe.rundir import read_json, write_parquet

from attnprobe.analyses.experiments import selectors
from attnprobe.analyses.experiments.selectors import Unit

SELECTORS = ("retrieval", "teacher-forced", "ablation", "duo", "kl-layers", "uniform-layers", "random", "razor")
FAMILIES = ("gated-deltanet", "kda", "sink+window+gdn")
CENSUS_COLUMNS = {"retrieval": "retrieval_score", "teacher-forced": "teacher_forced_retrieval_score"}
PAPER_BUDGETS = ("2%", "6.25%", "12.5%", "25%")


@dataclass
class HeadHybrid:
    """Which KV heads stay exact softmax and what the other heads become."""

    selector: str = field(default="retrieval", metadata={"help": f"ranks KV heads: {', '.join(SELECTORS)}"})
    kv_budget: str = field(default="12.5%", metadata={"help": "KV heads kept softmax: a share (2%, 6.25%, 0.125) or a count (3)"})
    family: str = field(default="gated-deltanet", metadata={"help": f"what the other heads become: {', '.join(FAMILIES)}"})
    draw: int = field(default=0, metadata={"help": "which random order the random selector takes"})
    probe_documents: int = field(default=8, metadata={"help": "ablation selector: synthetic key-value documents"})
    probe_length: int = field(default=1024, metadata={"help": "ablation and duo selectors: tokens per document"})
    kl_tokens: int = field(default=0, metadata={"help": "kl-layers selector: stage-2 tokens of each layer's short conversion "
                                                       "(default: one optimizer step of the recipe)"})

    def check(self, model: Model, census: Path | None) -> int:
        """Fail on a bad selector, family, budget or census before anything trains; returns the kept KV heads."""
        if self.selector not in SELECTORS:
            raise AttnprobeError(f"unknown selector '{self.selector}': choose from {', '.join(SELECTORS)}")
        if self.family not in FAMILIES:
            raise AttnprobeError(f"unknown family '{self.family}': choose from {', '.join(FAMILIES)}")
        if self.selector in CENSUS_COLUMNS:
            census_table(model, census, CENSUS_COLUMNS[self.selector])
        return kv_count(self.kv_budget, selectors.unit_count(model.info, "kv"))

    @property
    def name(self) -> str:
        draw = f"-draw{self.draw}" if self.selector == "random" else ""
        return f"hybrid-{self.family}-{self.selector}{draw}-{self.kv_budget}".replace("%", "pct")


def kv_count(budget: str | float, total: int) -> int:
    """KV heads kept: '6.25%' or 0.0625 a share of `total`, '3' a count. Neither none nor all of them."""
    text = str(budget).strip()
    try:
        if text.endswith("%"):
            count = round(float(text[:-1]) / 100 * total)
        elif text.isdigit():
            count = int(text)
        else:
            count = round(float(text) * total)
    except ValueError:
        raise AttnprobeError(f"cannot read a KV-head budget from '{budget}': give a share (6.25%, 0.125) or a count (3)") from None
    if not 0 < count < total:
        raise AttnprobeError(f"a KV-head budget of '{budget}' keeps {count} of the model's {total} KV heads: "
                             f"choose a budget that keeps between 1 and {total - 1}")
    return count


def census_table(model: Model, run: Path | None, column: str) -> pd.DataFrame:
    """A census's heads.parquet, refused when missing, from other weights or without `column`."""
    if run is None:
        raise AttnprobeError("this selector ranks heads by a census: run attnprobe census --model ... --out RUN and pass --from RUN")
    run = Path(run)
    if not (run / "heads.parquet").exists() or not (run / "manifest.json").exists():
        raise AttnprobeError(f"{run} holds no finished census: run attnprobe census --out {run} first")
    made_from = read_json(run / "manifest.json").get("weights_sha256")
    if made_from != model.info.weights_sha256:
        raise AttnprobeError(f"the census in {run} is of other weights ({str(made_from)[:12]}): run attnprobe census of this model")
    return selectors.retrieval_scores(run, column)


# ---- the selectors -------------------------------------------------------------------------------------------


def ablation_scores(model: Model, backend, documents: int, length: int, seed: int = 0) -> pd.DataFrame:
    """Per KV head, the drop of the answers' mean log-probability on synthetic key-value documents when the
    KV head's query heads are masked (z = 0), teacher-forced: (layer, unit, score)."""
    from attnprobe.analyses.conversion.retrieval_data import builder

    info, make, rng = model.info, builder(model), random.Random(seed)
    if info.max_context and length > info.max_context:
        raise AttnprobeError(f"ablation documents of {length} tokens exceed the model's window of {info.max_context}")
    docs = [make.kv(length, rng) for _ in range(documents)]
    ids = torch.tensor([d.ids for d in docs])

    def answer_logprob(edits) -> float:
        logits = backend.run(ids, edits=edits).float().log_softmax(-1)
        picked = [logits[i, t - 1, ids[i, t]] for i, d in enumerate(docs) for a, b in d.answers for t in range(a, b)]
        return float(torch.stack(picked).mean())

    base, group, rows = answer_logprob([]), info.n_heads // info.n_kv_heads, []
    for layer, kv in selectors.all_units(info, "kv"):
        masked = answer_logprob([zero_heads(layer, list(range(kv * group, (kv + 1) * group)))])
        rows.append({"layer": layer, "unit": kv, "score": base - masked})
    return pd.DataFrame(rows)


def kl_layer_scores(model: Model, backend, family: str, config, data, work: Path,
                    on_step: Callable = lambda p: None) -> pd.DataFrame:
    """Per layer, the KL to the teacher (on stage 2's fixed first batch, after a short conversion) gained by keeping
    that layer softmax over converting every head; each KV head of a layer gets its layer's score."""
    from attnprobe.analyses.conversion.train import convert

    info = model.info
    short = dataclasses.replace(config, kernel=family, ce_weight=0.0)

    def kl_with_softmax(layer: int | None) -> float:
        heads = {other: list(range(info.n_heads)) for other in range(info.n_layers) if other != layer}
        where = work / ("all-converted" if layer is None else f"softmax-layer-{layer}")
        return float(convert(model, backend, heads, short, data, where, on_step=on_step)["losses"]["first_batch_kl"][-1])

    baseline = kl_with_softmax(None)
    gains = {layer: baseline - kl_with_softmax(layer) for layer in range(info.n_layers)}
    return pd.DataFrame([{"layer": layer, "unit": kv, "score": gains[layer]} for layer, kv in selectors.all_units(info, "kv")])


def uniform_layers(info: ModelInfo, count: int) -> list[Unit]:
    """`count` KV heads in whole layers spaced evenly through the model (the last layer partly kept if needed)."""
    per_layer = info.n_kv_heads
    n = math.ceil(count / per_layer)
    layers = sorted({int((i + 0.5) * info.n_layers / n) for i in range(n)})
    return [(layer, kv) for layer in layers for kv in range(per_layer)][:count]


def ranking(model: Model, backend, hybrid: HeadHybrid, census: Path | None, seed: int = 0,
            kl: Callable[[], pd.DataFrame] | None = None) -> tuple[list[Unit], pd.DataFrame | None]:
    """The selector's KV heads best first (not for uniform-layers, whose sets do not nest) and the scores
    (layer, unit, score) they were ranked by (None for the selectors that order without one score)."""
    info = model.info
    if hybrid.selector in CENSUS_COLUMNS:
        scores = selectors.to_units(info, "kv", census_table(model, census, CENSUS_COLUMNS[hybrid.selector]))
    elif hybrid.selector == "ablation":
        scores = ablation_scores(model, backend, hybrid.probe_documents, hybrid.probe_length, seed)
    elif hybrid.selector == "duo":
        from attnprobe.analyses.experiments.config import DuoConfig

        scores = selectors.duo_gates(model, backend, DuoConfig(lengths=(hybrid.probe_length,), seed=seed))
    elif hybrid.selector == "kl-layers":
        if kl is None:
            raise AttnprobeError("the kl-layers selector needs training data: select through `attnprobe convert` (command.run)")
        scores = kl()
    elif hybrid.selector == "random":
        return selectors.random_order(info, "kv", seed), None
    elif hybrid.selector == "razor":
        induction, echo = selectors.razor_scores(model, backend)
        return selectors.razor_order(selectors.to_units(info, "kv", induction), selectors.to_units(info, "kv", echo)), None
    else:
        raise AttnprobeError(f"the {hybrid.selector} selector has no ranking: its sets depend on the budget")
    return selectors.order_by_score(scores), scores


def kept_kv_heads(model: Model, backend, hybrid: HeadHybrid, census: Path | None, out: Path,
                  kl: Callable[[], pd.DataFrame] | None = None) -> list[Unit]:
    """The KV heads `hybrid` keeps softmax; the ranking is saved in out/selection/ (a rerun reads it back)."""
    count = hybrid.check(model, census)
    if hybrid.selector == "uniform-layers":
        return uniform_layers(model.info, count)
    seed = hybrid.draw if hybrid.selector == "random" else 0
    path = Path(out) / "selection" / f"{hybrid.selector}-{seed}.parquet"
    if path.exists():
        table = pd.read_parquet(path)
        order = [(int(r.layer), int(r.unit)) for r in table.sort_values("rank").itertuples()]
    else:
        order, scores = ranking(model, backend, hybrid, census, seed, kl)
        write_parquet(path, selectors.ranking_rows(hybrid.selector, seed, order, scores))
    return order[:count]


def variant(model: Model, hybrid: HeadHybrid, units: Sequence[Unit]):
    """The conversion row: every query head of the kept KV heads softmax, the rest `hybrid.family`."""
    from attnprobe.analyses.experiments.architectures import Variant

    keep = selectors.heads_of(model.info, "kv", units)
    total = selectors.unit_count(model.info, "kv")
    return Variant(hybrid.name, hybrid.family, lambda m, t, keep=frozenset(keep): set(keep),
                   f"{len(units)} of {total} KV heads softmax by {hybrid.selector}, the rest {hybrid.family}")


def overlap_by_budget(model: Model, sets: Callable[[str, int, int], list[Unit]], chosen: Sequence[str],
                      budgets: Sequence[str], draws: int = 3) -> pd.DataFrame:
    """Jaccard overlap of every pair of selectors' KV-head sets at each budget (random: `draws` draws), in the
    columns of budget.py's overlap.parquet; `sets(selector, seed, count)` gives a selector's kept KV heads."""
    total = selectors.unit_count(model.info, "kv")
    tables = []
    for budget in budgets:
        count = kv_count(budget, total)
        rows = []
        for selector in chosen:
            for seed in range(draws if selector == "random" else 1):
                kept = sets(selector, seed, count)
                order = kept + [u for u in selectors.all_units(model.info, "kv") if u not in kept]
                rows.append(selectors.ranking_rows(selector, seed, order, None))
        tables.append(selectors.overlap_table(pd.concat(rows, ignore_index=True), [count / total], total).assign(budget=budget))
    return pd.concat(tables, ignore_index=True)


def write_overlap(model: Model, backend, hybrid: HeadHybrid, census: Path | None, out: Path, draws: int = 3) -> pd.DataFrame:
    """out/selection/overlap.parquet: the overlap of `hybrid`'s selector with the selectors that cost nothing more
    (uniform layers, `draws` random orders, and the census's two scores when a census is given) at the issue's
    budgets and `hybrid`'s own, those of them that keep neither none nor all of the model's KV heads."""
    total = selectors.unit_count(model.info, "kv")
    budgets = []
    for budget in dict.fromkeys((*PAPER_BUDGETS, hybrid.kv_budget)):
        try:
            kv_count(budget, total)
            budgets.append(budget)
        except AttnprobeError:  # e.g. 2 % of a tiny model's KV heads is none
            continue
    chosen = list(dict.fromkeys([hybrid.selector, "uniform-layers", "random", *(CENSUS_COLUMNS if census else ())]))

    def sets(selector: str, seed: int, count: int) -> list[Unit]:
        other = dataclasses.replace(hybrid, selector=selector, kv_budget=str(count), draw=seed)
        return kept_kv_heads(model, backend, other, census, out)  # the rankings saved by the selection are read back

    table = overlap_by_budget(model, sets, chosen, budgets, draws)
    write_parquet(Path(out) / "selection" / "overlap.parquet", table)
    return table
