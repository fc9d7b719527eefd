"""Which heads must stay exact: the selector x budget sweep, and the sparse-attention rows.

For each replacement kind (streaming sink + window heads at today's 4 + 64 and DuoAttention's 64 + 256,
or any registered kernel, fitted when it learns), each selector's ranking (analyses/selectors.py)
keeps a budget of units exact (6.25-75 % of KV heads, or of heads) and every other head becomes the
kind. Each cell measures recall (the registry tasks in `tasks`, passkey and NIAH by default; 95 % intervals), perplexity and KV-cache bytes;
reference cells are the original model and every head replaced. Sparse rows replace every head by a
sparse rule (kernels/sparse), and a needle table says per head which share of the needle each rule keeps.

A run directory holds (tidy parquet): rankings.parquet, budget.parquet (one row per cell and task),
budget_samples.parquet (every sample), overlap.parquet (Jaccard of selectors' sets per budget and
kind), needle_keep.parquet, manifest.json; cells/ keeps each finished cell so a rerun resumes.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from attnprobe.hooks.backends import Backend
from attnprobe.hooks.backends.base import decoder_layers
from attnprobe.hooks.embedded import file_sha256
from attnprobe.hooks.edits import Edit
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model, ModelInfo
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site
from attnprobe.hooks.swap import swap_edits
from attnprobe.kernels.fit import FitResult
from attnprobe.kernels.registry import KERNELS, make_kernel
from attnprobe.probe import texts
from attnprobe.probe.perplexity import held_out_perplexity
from attnprobe.probe.retrieval import build_sample, load_needles
from attnprobe.probe.rundir import RunDir, read_json, readable, same_settings, write_json, write_parquet

from attnprobe.analyses import tasks as recall_tasks
from attnprobe.analyses.stats import cluster_bootstrap, wilson_interval

from attnprobe.analyses.experiments import selectors
from attnprobe.analyses.experiments.architectures import cache_bytes_per_token, fitted_kernel
from attnprobe.analyses.experiments.selection import Head
from attnprobe.analyses.experiments.config import BUDGETS, SELECTORS, SPARSE, STREAMING, TASKS, BudgetSizes  # noqa: F401 (budget.BUDGETS ... stay)



@dataclass(frozen=True)
class Kind:
    """A replacement written KERNEL[:option=value,...], e.g. sink+window:sinks=64,window=256."""

    spec: str
    kernel: str
    options: dict

    @property
    def label(self) -> str:
        return self.spec


def _choose(what: str, given: Sequence[str], known: Sequence[str], empty_ok: bool = True) -> None:
    unknown = sorted(set(given) - set(known)) or ([] if given or empty_ok else ["(none)"])
    if unknown:
        raise AttnprobeError(f"unknown {what}(s) {', '.join(unknown)}: choose from {', '.join(known)}")


def parse_spec(text: str) -> Kind:
    name, _, rest = text.strip().partition(":")
    if name not in KERNELS:
        raise AttnprobeError(f"unknown kernel '{name}' in '{text}': choose one of {', '.join(KERNELS)}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key.strip()] = int(value)
        except ValueError:
            raise AttnprobeError(f"cannot read option '{item}' of '{text}': write KERNEL:name=integer,name=integer") from None
    learnable = make_kernel(name, 1, 8, **options).learnable  # unknown options fail here, before any model work
    if learnable and options:
        raise AttnprobeError(f"'{text}': a fitted kernel takes its options from the fit; give the name alone")
    return Kind(text.strip(), name, options)


# --- rankings ------------------------------------------------------------------------------------

def selector_rankings(model: Model, backend: Backend, out: Path, sizes: BudgetSizes, census: Path | None,
                      kernels: dict[str, FitResult | str], progress: Callable[[str], None]) -> pd.DataFrame:
    """Every selector's unit order (rankings.parquet: selector, kind, seed, rank, layer, unit, score).

    `kind` is the replacement a ranking belongs to ("any" unless it is the fit error of that kind).
    Each selector's table is saved under rankings/ once made."""
    info, unit = model.info, sizes.unit
    tables = []

    def cached(name: str, make: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        path = out / "rankings" / f"{_safe(name)}.parquet"
        if readable(path):  # a damaged table is made again
            return pd.read_parquet(path)
        progress(f"ranking: {name}")
        table = make()
        write_parquet(path, table)
        return table

    for selector in sizes.selectors:
        if selector == "retrieval":
            def make():
                scores = selectors.to_units(info, unit, selectors.retrieval_scores(census))
                return selectors.ranking_rows("retrieval", 0, selectors.order_by_score(scores), scores)
            tables.append(cached("retrieval", make))
        elif selector == "razor":
            def make():
                induction, echo = selectors.razor_scores(model, backend, sizes.razor_length, sizes.razor_batch)
                induction, echo = (selectors.to_units(info, unit, t) for t in (induction, echo))
                order = selectors.razor_order(induction, echo)
                return selectors.ranking_rows("razor", 0, order, induction)
            tables.append(cached("razor", make))
        elif selector == "duo":
            def make():
                gates = selectors.duo_gates(model, backend, sizes.duo)
                scores = gates if unit == "kv" else selectors.gates_as_heads(info, gates).rename(columns={"head": "unit"})
                return selectors.ranking_rows("duo", 0, selectors.order_by_score(scores), scores)
            tables.append(cached("duo", make))
        elif selector == "fit":
            for spec, kernel in kernels.items():
                def make(spec=spec, kernel=kernel):
                    if isinstance(kernel, FitResult):
                        errors = pd.DataFrame([{"layer": l, "head": h, "score": loss} for l in kernel.heads
                                               for h, loss in zip(kernel.heads[l], kernel.losses[l])])
                    else:
                        kind = parse_spec(spec)
                        errors = selectors.fit_errors(model, backend, kind.kernel, sizes.fit_tokens, **kind.options)
                    scores = selectors.to_units(info, unit, errors)
                    return selectors.ranking_rows("fit", 0, selectors.order_by_score(scores), scores).assign(kind=spec)
                tables.append(cached(f"fit-{spec}", make))
        elif selector == "random":
            for seed in range(sizes.seeds):
                tables.append(selectors.ranking_rows("random", seed, selectors.random_order(info, unit, seed), None))
        else:
            raise AttnprobeError(f"unknown selector '{selector}': choose from {', '.join(selectors.SELECTORS)}")
    table = pd.concat(tables, ignore_index=True)
    if "kind" not in table:
        table["kind"] = "any"
    return table.fillna({"kind": "any"})


def for_kind(rankings: pd.DataFrame, kind: str) -> pd.DataFrame:
    return rankings[rankings["kind"].isin(["any", kind])]


# --- one cell --------------------------------------------------------------------------------------

def kind_edits(model: Model, kernel: FitResult | str, options: dict, keep: set[Head], chunk: int) -> list[Edit]:
    """Every head not in `keep` replaced by the kernel (fitted parameters, or a fresh one with `options`)."""
    info, edits = model.info, []
    extra = {} if isinstance(kernel, FitResult) else {**options, "chunk": chunk}
    for layer in range(info.n_layers):
        replaced = [h for h in range(info.n_heads) if (layer, h) not in keep]
        if replaced:
            edits += swap_edits(model, kernel, layers=[layer], heads=replaced, **extra)
    return edits


def evaluate(model: Model, backend: Backend, edits: Sequence[Edit], sizes: BudgetSizes, label: str) -> tuple[pd.DataFrame, float]:
    """The samples of the tasks in `sizes.tasks` and the perplexity under `edits`."""
    with backend.patched(list(edits)):
        samples = recall_tasks.run_sized(model, sizes.tasks, sizes, label)
    perplexity = held_out_perplexity(backend, sizes.perplexity_tokens, edits=list(edits))
    return samples.drop(columns=["response"], errors="ignore"), perplexity


@dataclass
class Cell:
    kind: str  # the replacement ("none" for the original)
    selector: str  # a selector; "all-exact" (original), "none-exact" (every head replaced) or "sparse"
    seed: int
    budget: float  # share of units kept exact
    units: list  # the kept units

    @property
    def name(self) -> str:
        return _safe(f"{self.kind}__{self.selector}__s{self.seed}__b{self.budget:g}")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def coarse_first(values: Sequence[float]) -> list[float]:
    """Sorted values, middles first (0.25, 0.125, 0.75, 0.0625, 0.5 of the defaults), so a sweep cut
    short by its time limit still spans the range."""
    order, spans = [], [sorted(values)]
    while spans:
        span = spans.pop(0)
        if span:
            middle = len(span) // 2
            order.append(span[middle])
            spans += [span[:middle], span[middle + 1:]]
    return order


def dense_layers(rule: str) -> int:
    """The first layers a sparse rule's method leaves dense (Quest: 0-1), kept exact in its row."""
    kind = parse_spec(rule)
    return make_kernel(kind.kernel, 1, 8, **kind.options).dense_layers


def plan(sizes: BudgetSizes, rankings: pd.DataFrame, info: ModelInfo) -> list[Cell]:
    """Cells in the order they run (a time limit cuts the tail): the references, the first kind's
    budgets (coarse first) x selectors, the sparse rows, then the other kinds."""
    n_units = selectors.unit_count(info, sizes.unit)
    everyone = selectors.all_units(info, sizes.unit)
    cells = [Cell("none", "all-exact", -1, 1.0, everyone)]
    cells += [Cell(kind, "none-exact", -1, 0.0, []) for kind in sizes.kinds]
    grids = []
    for kind in sizes.kinds:
        ranked, grid = for_kind(rankings, kind), []
        for fraction in coarse_first(sizes.budgets):
            count = selectors.budget_count(fraction, n_units)
            for selector, seed in ranked[["selector", "seed"]].drop_duplicates().itertuples(index=False):
                grid.append(Cell(kind, selector, int(seed), fraction, selectors.kept_units(ranked, selector, int(seed), count)))
        grids.append(grid)
    sparse = [Cell(rule, "sparse", -1, 0.0, [u for u in everyone if u[0] < dense_layers(rule)]) for rule in sizes.sparse]
    return cells + (grids[0] if grids else []) + sparse + [cell for grid in grids[1:] for cell in grid]


def summarise(cell: Cell, samples: pd.DataFrame, perplexity: float, info: ModelInfo, unit: str,
              per_token: int, fixed: int) -> pd.DataFrame:
    """One row per task: the cell, accuracy with its 95 % interval (Wilson; a bootstrap over strings for
    a teacher-forced task), perplexity, cache bytes."""
    exact = len(selectors.heads_of(info, unit, cell.units))
    rows = []
    for task in sorted(set(samples["task"])):
        group = samples[samples["task"] == task]
        correct, total = int(group["correct"].sum()), len(group)
        accuracy, (low, high) = correct / total if total else math.nan, wilson_interval(correct, total)
        if recall_tasks.task(task).teacher_forced:  # the share of tokens right, resampled by string
            scored = group["length"].sub(1)
            accuracy, low, high = cluster_bootstrap((group["token_accuracy"] * scored).tolist(), scored.tolist())
        rows.append({"kind": cell.kind, "selector": cell.selector, "seed": cell.seed, "budget": cell.budget,
                     "units": len(cell.units), "exact_heads": exact, "task": task, "correct": correct, "n": total,
                     "accuracy": accuracy, "ci_low": low, "ci_high": high,
                     "perplexity": perplexity, "kv_bytes_per_token": per_token, "fixed_bytes": fixed})
    return pd.DataFrame(rows)


# --- needle shares of the sparse rules -----------------------------------------------------------

def needle_keep(model: Model, backend: Backend, rules: Sequence[str], sizes: BudgetSizes) -> pd.DataFrame:
    """Per rule and head, the share of the needle's (and its answer's) tokens the rule keeps for the
    query that produces the answer (the prompt's last token, a decode step), and for the last prefilled query."""
    if not rules:
        return pd.DataFrame()
    info = model.info
    attention = decoder_layers(model.hf)
    hay = texts.haystack_ids(model.tokenizer, max(sizes.niah_lengths))
    needles = load_needles()
    grid = [(length, depth) for length in sizes.niah_lengths for depth in sizes.niah_depths][: sizes.needle_samples]
    rows = []
    for index, (length, depth) in enumerate(grid):
        needle = needles[index % len(needles)]
        sample = build_sample(model.tokenizer, hay[:length], needle, depth)
        ids = torch.tensor([sample["prompt_ids"]], device=model.device)
        reads = {(layer, site): Keep(on_device=True) for layer in range(info.n_layers) for site in (Site.Q, Site.K)}
        backend.run(ids, reads)
        spans = {"needle": sample["needle_span"], "answer": sample["answer_span"]}
        n = ids.shape[1]
        for layer in range(info.n_layers):
            q, k = reads[(layer, Site.Q)].result(), reads[(layer, Site.K)].result()
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            scaling = float(getattr(attention[layer].self_attn, "scaling", info.head_dim ** -0.5))
            for rule in rules:
                kind = parse_spec(rule)
                kernel = make_kernel(kind.kernel, info.n_heads, info.head_dim, **kind.options)
                for query, decode in (("answer step", True), ("last prefill query", False)):
                    seen = n if decode else n - 1  # greedy decoding prefills all but the prompt's last token
                    qs, ks = q[:, :, :seen], k[:, :, :seen]
                    context = None if decode else kernel.context(qs, ks, scaling)
                    kept = kernel.keep_rows(qs[:, :, -1:], ks, scaling, torch.tensor([seen - 1], device=q.device),
                                            decode=decode, context=context)[0, :, 0]  # (H, S)
                    if layer < kernel.dense_layers:  # the row keeps these layers exact
                        kept = torch.ones_like(kept)
                    for head in range(info.n_heads):
                        row = {"rule": rule, "sample": index, "length": length, "depth": depth, "query": query,
                               "layer": layer, "head": head, "kv_head": info.kv_head(head),
                               "kept_share": float(kept[head].float().mean())}
                        for name, (start, stop) in spans.items():
                            row[f"{name}_share"] = float(kept[head, start:stop].float().mean())
                        rows.append(row)
    return pd.DataFrame(rows)


# --- the sweep -----------------------------------------------------------------------------------

def notes(info: ModelInfo, unit: str) -> list[str]:
    said = []
    if unit == "kv" and info.n_kv_heads == 1:
        said.append(f"{info.model_id} has one KV head per layer: KV-head selection keeps or replaces whole layers")
    if unit == "kv" and info.n_kv_heads < info.n_heads:
        said.append(f"units are KV heads ({info.n_layers} x {info.n_kv_heads}); each keeps its {info.n_heads // info.n_kv_heads} "
                    "query heads exact together, and KV-head scores are the maximum over those heads")
    if "sliding" in info.layer_types:
        said.append("sliding-window layers cache only their window when exact; replaced heads use the kind's own tokens")
    return said


def run_sweep(model: Model, backend: Backend, out: Path, sizes: BudgetSizes, census: Path | None = None,
              time_limit: float | None = None, progress: Callable[[str], None] = lambda m: None) -> dict[str, pd.DataFrame]:
    """Run (or resume) the sweep into `out`; stop starting cells after `time_limit` seconds. Returns the tables."""
    started = time.time()
    recall_tasks.preflight(model, sizes.tasks, sizes, sizes.allow_small)  # names, window and sample counts
    if sizes.unit not in selectors.UNITS:
        raise AttnprobeError(f"unknown unit '{sizes.unit}': choose kv (KV heads, whose cache is kept whole) or head")
    kinds = {spec: parse_spec(spec) for spec in (*sizes.kinds, *sizes.sparse)}
    if "retrieval" in sizes.selectors:
        selectors.retrieval_scores(census)  # fail before any model work
    with RunDir(out).lock():
        return _sweep(model, backend, Path(out), sizes, kinds, census, started, time_limit, progress)


# which cells a run makes (not what a cell holds): runs that split the sweep between them may differ in these
PLAN_FIELDS = ("budgets", "selectors", "seeds", "kinds", "sparse", "needle_samples")


def _needles_cover(path: Path, sizes: BudgetSizes) -> bool:
    """Whether the saved needle table reads back and holds exactly these sparse rules and samples."""
    if not readable(path):
        return False
    table = pd.read_parquet(path)
    return (set(table.get("rule", [])) == set(sizes.sparse)
            and table.get("sample", pd.Series(dtype=int)).nunique() == min(sizes.needle_samples, len(sizes.niah_lengths) * len(sizes.niah_depths)))


def settings(model: Model, sizes: BudgetSizes, census: Path | None) -> dict:
    """What a budget run's saved rankings and cells hold depends on: a rerun must match it to reuse them. The
    census counts (by its heads table's hash) where the retrieval selector ranks by it."""
    chosen = {key: value for key, value in asdict(sizes).items() if key not in PLAN_FIELDS}
    if "retrieval" in sizes.selectors:
        chosen["census_heads_sha256"] = file_sha256(Path(census) / "heads.parquet")
    return {"weights_sha256": model.info.weights_sha256, **chosen}


def _sweep(model: Model, backend: Backend, out: Path, sizes: BudgetSizes, kinds: dict[str, Kind], census: Path | None,
           started: float, time_limit: float | None, progress: Callable[[str], None]) -> dict[str, pd.DataFrame]:
    info = model.info
    saved = [out / name for name in ("cells", "rankings", "fits", "needle_keep.parquet", "budget.parquet")]
    same_settings(out / "settings.json", settings(model, sizes, census), "the rankings and cells",
                  started=any(path.exists() for path in saved), merge=True)
    kernels = {}
    for spec, kind in kinds.items():
        progress(f"kernel {spec}")  # learned kernels are fitted once over every head (saved under fits/)
        kernels[spec] = fitted_kernel(model, backend, kind.kernel, out / "fits", sizes.fit_tokens, sizes.fit_steps)
    rankings = selector_rankings(model, backend, out, sizes, census, {s: kernels[s] for s in sizes.kinds}, progress)
    write_parquet(out / "rankings.parquet", rankings)
    n_units = selectors.unit_count(info, sizes.unit)
    overlap = pd.concat([selectors.overlap_table(for_kind(rankings, kind), sizes.budgets, n_units).assign(kind=kind)
                         for kind in sizes.kinds], ignore_index=True) if sizes.kinds else pd.DataFrame()
    write_parquet(out / "overlap.parquet", overlap)
    needle_path = out / "needle_keep.parquet"
    if sizes.sparse and not _needles_cover(needle_path, sizes):
        progress("needle shares of the sparse rules")
        write_parquet(needle_path, needle_keep(model, backend, sizes.sparse, sizes))
    summaries, samples, skipped = [], [], 0
    for cell in plan(sizes, rankings, info):
        where = out / "cells" / cell.name
        if readable(where / "summary.parquet") and readable(where / "samples.parquet"):  # a damaged cell runs again
            summaries.append(pd.read_parquet(where / "summary.parquet"))
            samples.append(pd.read_parquet(where / "samples.parquet"))
            continue
        if time_limit is not None and time.time() - started > time_limit:
            skipped += 1
            continue
        progress(f"{cell.kind} {cell.selector} seed {cell.seed} budget {cell.budget:g}")
        keep = selectors.heads_of(info, sizes.unit, cell.units)
        kind = kinds.get(cell.kind)
        edits = [] if kind is None else kind_edits(model, kernels[cell.kind], kind.options, keep, sizes.chunk)
        rows, perplexity = evaluate(model, backend, edits, sizes, cell.name)
        rows = rows.assign(kind=cell.kind, selector=cell.selector, seed=cell.seed, budget=cell.budget)
        per_token, fixed = (cache_bytes_per_token(model, set(), None) if kind is None else
                            cache_bytes_per_token(model, keep, kind.kernel, **kind.options))
        summary = summarise(cell, rows, perplexity, info, sizes.unit, per_token, fixed)
        write_parquet(where / "samples.parquet", rows)
        write_parquet(where / "summary.parquet", summary)
        summaries.append(summary)
        samples.append(rows)
    budget = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    write_parquet(out / "budget.parquet", budget)
    write_parquet(out / "budget_samples.parquet", pd.concat(samples, ignore_index=True) if samples else pd.DataFrame())
    manifest = {"command": "budget", "model_id": info.model_id, "weights_sha256": info.weights_sha256,
                "census": str(census) if census else None, "sizes": asdict(sizes), "notes": notes(info, sizes.unit),
                "cells_skipped_for_time": skipped, "wall_time_s": time.time() - started, "info": info.to_dict()}
    previous = read_json(out / "manifest.json") if readable(out / "manifest.json") else {}
    manifest["wall_time_s"] += previous.get("wall_time_s", 0.0) if isinstance(previous, dict) else 0.0
    write_json(out / "manifest.json", manifest)
    return {"budget": budget, "rankings": rankings, "overlap": overlap,
            "needle_keep": pd.read_parquet(needle_path) if needle_path.exists() else pd.DataFrame()}


def winners(budget: pd.DataFrame, task: str = "passkey") -> pd.DataFrame:
    """Per kind and budget, the selector(s) with the highest accuracy (random pooled over its draws; ties joined by '=')."""
    table = budget[(budget["task"] == task) & budget["selector"].isin(SELECTORS)]
    if table.empty:
        return pd.DataFrame(columns=["kind", "budget", "selector", "accuracy"])
    pooled = table.groupby(["kind", "budget", "selector"], as_index=False)[["correct", "n"]].sum()
    pooled["accuracy"] = pooled["correct"] / pooled["n"]
    best = pooled[pooled["accuracy"] == pooled.groupby(["kind", "budget"])["accuracy"].transform("max")]
    return (best.groupby(["kind", "budget"], as_index=False)
            .agg(selector=("selector", lambda s: " = ".join(sorted(s))), accuracy=("accuracy", "first")))
