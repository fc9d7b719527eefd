"""Render every results table that README.md and benchmarks/RESULTS.md quote from the records committed under
benchmarks/results/, between `<!-- table:NAME -->` and `<!-- /table:NAME -->` markers.

    python benchmarks/render_tables.py           rewrite the tables in both documents
    python benchmarks/render_tables.py --check   print the differences and exit 1 when a document is stale

A table's numbers come only from its records (parquet, json, jsonl, and the matrix's own markdown for the sample
counts n); a missing record is an error, never a blank table. tests/test_records.py re-renders and compares.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
from attnprobe.analyses.experiments.ablation import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md")
MARKER = re.compile(r"<!-- table:(?P<name>[\w.-]+) -->\n.*?<!-- /table:(?P=name) -->", re.S)


class MissingRecord(FileNotFoundError):
    """A table names a record that is not committed."""


def record(relative: str) -> Path:
    path = RESULTS / relative
    if not path.exists():
        raise MissingRecord(f"record benchmarks/results/{relative} is not committed")
    return path


# ---- reading records ------------------------------------------------------------------------------------------
def events(relative: str, kind: str) -> list[dict]:
    """The events of one kind in a results .jsonl (gpu_convert.py and the GPU drivers write one per line)."""
    with record(relative).open() as lines:
        found = [event for event in map(json.loads, filter(str.strip, lines)) if event.get("kind") == kind]
    if not found:
        raise ValueError(f"{relative} holds no '{kind}' event")
    return found


def last_row(relative: str, kind: str, architecture: str) -> dict:
    """The last row for `architecture` among a .jsonl's `kind` events ('matrix' or 'census')."""
    rows = [row for event in events(relative, kind) for row in event["rows"] if row["architecture"] == architecture]
    if not rows:
        raise ValueError(f"{relative} has no {kind} row for {architecture}")
    return rows[-1]


def converted(relative: str, row: str) -> dict:
    found = [event for event in events(relative, "converted") if event["row"] == row]
    if not found:
        raise ValueError(f"{relative} did not record converting {row}")
    return found[-1]


def markdown_rows(relative: str) -> dict[str, dict[str, str]]:
    """A matrix.md record (pandas' to_markdown) as {architecture: {column: cell}}."""
    lines = [line for line in record(relative).read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        rows[cells["architecture"]] = cells
    return rows


def sample_count(cell: str) -> int:
    found = re.search(r"n=(\d+)", cell)
    if not found:
        raise ValueError(f"no sample count in the matrix cell '{cell}'")
    return int(found.group(1))


# ---- formatting -------------------------------------------------------------------------------------------------
def whole(accuracy: float, n: int) -> int:
    correct = round(accuracy * n)
    if abs(correct - accuracy * n) > 1e-6:
        raise ValueError(f"accuracy {accuracy} is not a whole number of {n} samples")
    return correct


def count_cell(accuracy: float, n: int) -> str:
    """`correct/n (low-high)`, the 95 % Wilson interval."""
    correct = whole(accuracy, n)
    low, high = wilson_interval(correct, n)
    return f"{correct}/{n} ({low:.2f}-{high:.2f})"


def rate_cell(accuracy: float, n: int) -> str:
    """A token accuracy over n tokens with its Wilson interval."""
    low, high = wilson_interval(whole(accuracy, n), n)
    return f"{accuracy:.2f} ({low:.2f}-{high:.2f})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def gate_cell(gate: str, limit: str | None) -> str:
    word = {"pass": "**pass**", "FAIL": "**fail**", "reference": "reference"}[gate]
    return f"{word} ({float(limit):.2f})" if limit not in (None, "nan") and gate != "reference" else word


def tokens_cell(tokens: int) -> str:
    return f"{tokens / 1e6:.1f}M"


# ---- census -------------------------------------------------------------------------------------------------------
def census_column(relative: str, massive_relative: str | None = None) -> list[str]:
    """One census run directory summarised: the rows of `census_table`; the massive-activation rows come from
    `massive_relative` where a later run measured them again."""
    manifest = json.loads(record(f"{relative}/manifest.json").read_text())
    sink = json.loads(record(f"{relative}/sink_rate.json").read_text())
    heads = pd.read_parquet(record(f"{relative}/heads.parquet"))
    massive_run = massive_relative or relative
    massive = pd.read_parquet(record(f"{massive_run}/massive.parquet"))
    intervention = pd.read_parquet(record(f"{massive_run}/massive_intervention.parquet")).set_index("intervention")
    thresholds, info = manifest["config"]["thresholds"], manifest["info"]

    def top(column: str, threshold: float, shown: int = 3) -> str:
        above = heads[heads[column] > threshold].sort_values(column, ascending=False)
        best = ", ".join(f"{r.layer}.{r.head} = {getattr(r, column):.2f}" for r in above.head(shown).itertuples())
        return f"{len(above)} above {threshold:g}" + (f": {best}" if len(above) else "")

    dims = massive.groupby("dim")["value"].agg(lambda v: v.abs().max()).sort_values(ascending=False)
    layers = f"{massive['layer'].min()}-{massive['layer'].max()}"
    zero = intervention.loc["zero"]
    return [
        f"{info['n_layers']} x {info['n_heads']} ({info['n_kv_heads']} KV heads), {manifest['dtype']}",
        f"{sink['without_bos']:.1f} % / {sink['with_bos']:.1f} % (Sink_1^{sink['eps']:g}, T = {sink['T']}, {sink['n_sequences']} sequences)",
        top("retrieval_score", thresholds["retrieval"], 5),
        f"{(heads['retrieval_score'] == 0).mean() * 100:.0f} %",
        top("induction_score", thresholds["induction"]),
        top("prev_token_score", thresholds["previous_token"]),
        ", ".join(f"{dim} (up to {value:,.0f})" for dim, value in dims.head(2).items()) + f", layers {layers}",
        f"{intervention.loc['none', 'perplexity']:,.2f} -> {zero['perplexity']:,.2f} (zero) / "
        f"{intervention.loc['mean', 'perplexity']:,.2f} (mean) at {onsets(zero['dim_layers']) if 'dim_layers' in zero else f'layer {int(zero.layer)}'}",
        f"{int((heads['hidden_sink_count'] > 0).sum())} of {len(heads)}",
    ]


def onsets(dim_layers: str) -> str:
    """'247:11 507:11' -> 'layer 11'; '62:2 490:3' -> 'their onsets (62 at layer 2, 490 at 3)'."""
    pairs = [pair.split(":") for pair in dim_layers.split()]
    layers = {layer for _, layer in pairs}
    if len(layers) == 1:
        return f"layer {layers.pop()}"
    return "their onsets (" + ", ".join(f"{dim} at {'layer ' if i == 0 else ''}{layer}" for i, (dim, layer) in enumerate(pairs)) + ")"


CENSUS_ROWS = ["layers x heads, dtype", "sink rate without / with BOS",
               "retrieval heads (best five)", "heads with retrieval score 0", "induction heads (best three)",
               "previous-token heads (best three)", "massive activations: dims (largest magnitude), layers",
               "perplexity, massive dims zeroed / set to their mean", "heads with a hidden sink"]


def census_table(runs: dict[str, tuple[str, ...]]) -> Callable[[], str]:
    def render() -> str:
        columns = [census_column(*relatives) for relatives in runs.values()]
        return table(["", *runs], [[name, *cells] for name, *cells in zip(CENSUS_ROWS, *columns)])

    return render


# ---- masking sweep ----------------------------------------------------------------------------------------------
def masking_table(relative: str) -> Callable[[], str]:
    def render() -> str:
        sweep = pd.read_parquet(record(f"{relative}/ablation.parquet"))
        rows = []
        none = sweep[sweep.selection == "none"].iloc[0]
        rows.append(["none", count_cell(none.accuracy, int(none.n)), ""])
        for k in sorted(sweep[sweep.selection == "top"].k.unique()):
            top = sweep[(sweep.selection == "top") & (sweep.k == k)].iloc[0]
            pooled = sweep[(sweep.selection == "random-pooled") & (sweep.k == k)].iloc[0]
            draws = sweep[(sweep.selection == "random") & (sweep.k == k)].accuracy
            rows.append([f"top {k} by retrieval score", count_cell(top.accuracy, int(top.n)), ""])
            rows.append([f"{k} random, {len(draws)} draws pooled", count_cell(pooled.accuracy, int(pooled.n)),
                         f"{draws.min():.2f}-{draws.max():.2f}"])
        return table(["heads masked", "NIAH correct (95 % Wilson)", "single draws"], rows)

    return render


# ---- converted rows ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One matrix row and the records that hold it: its evaluation (.jsonl), the matrix markdown of the same
    evaluation sizes (sample counts), its conversion (.jsonl with a 'converted' event) and its small census."""

    label: str
    architecture: str
    evaluation: str
    sizes: str
    training: str | None = None
    census: str | None = None  # a .jsonl with a 'census' event, or a .json of one row


RECALL = (("passkey_acc", count_cell), ("kv_recall_acc", count_cell), ("copy_acc", rate_cell), ("niah_acc", count_cell))


def census_row(row: Row) -> dict | None:
    if row.census is None:
        return None
    if row.census.endswith(".jsonl"):
        return last_row(row.census, "census", row.architecture)
    return json.loads(record(row.census).read_text())


def conversion_cells(row: Row, with_census: bool) -> list[str]:
    evaluated = last_row(row.evaluation, "matrix", row.architecture)
    matrix = markdown_rows(row.sizes)
    # an evaluation without a .md of its own takes only the sample counts n from one of the same sizes
    sizes = matrix.get(row.architecture, {**matrix["original"], "softmax_heads": "-", "gate_limit": None})
    cells = [row.label, sizes["softmax_heads"]]
    if row.training is None:
        cells += ["-", "-"]
    else:
        event = converted(row.training, row.architecture)
        before, after = event["first_batch_kl"]
        digits = 4 if after < 0.01 else 3
        cells += [tokens_cell(event["budget"]["tokens"]), f"{before:.{digits}f} -> {after:.{digits}f}"]
    ratio = evaluated.get("ppl_vs_control", math.nan)
    cells += [f"{evaluated['perplexity']:.2f}", "-" if math.isnan(ratio) else f"{ratio:.2f}",
              gate_cell(evaluated.get("gate", "reference"), sizes.get("gate_limit"))]
    cells += [fmt(evaluated[key], sample_count(sizes[key])) for key, fmt in RECALL]
    if with_census:
        found = census_row(row)
        cells += ["-", "-"] if found is None else [f"{found['sink_rate']:.1f}", str(found["induction_heads"])]
    return cells


CONVERSION_HEADER = ["row", "softmax heads", "stage-2 tokens", "KL on a fixed batch", "perplexity", "/ control", "gate (limit)",
                     "passkey", "key-value", "copy (token acc.)", "NIAH"]


def conversion_table(rows: tuple[Row, ...], with_census: bool = False) -> Callable[[], str]:
    def render() -> str:
        header = CONVERSION_HEADER + (["sink rate %", "induction heads"] if with_census else [])
        return table(header, [conversion_cells(row, with_census) for row in rows])

    return render


QWEN_04, QWEN_06 = "qwen-matrix-h200-2026-12-04", "qwen-matrix-h200-2026-12-06"
QWEN_ROWS = (
    Row("original", "original", f"{QWEN_04}/evaluate-results.jsonl", f"{QWEN_04}/matrix.md"),
    Row("control", "control", f"{QWEN_04}/evaluate-results.jsonl", f"{QWEN_04}/matrix.md", f"{QWEN_04}/train-results.jsonl"),
    Row("sink+window+linear", "sink+window+linear", f"{QWEN_04}/evaluate-results.jsonl", f"{QWEN_04}/matrix.md",
        f"{QWEN_04}/train-results.jsonl"),
    Row("all-hedgehog", "all-hedgehog", f"{QWEN_04}/evaluate-results.jsonl", f"{QWEN_04}/matrix.md", f"{QWEN_04}/train-results.jsonl"),
    Row("control (second run)", "control", f"{QWEN_06}/evaluate-results.jsonl", f"{QWEN_06}/matrix.md",
        f"{QWEN_06}/train-results.jsonl"),
    Row("layers-1of2-softmax (against the second control)", "layers-1of2-softmax", f"{QWEN_06}/evaluate-results.jsonl",
        f"{QWEN_06}/matrix.md", f"{QWEN_06}/train-results.jsonl"),
)

C02C, C02D, C02E = "convert-families-h200-2026-12-02c", "convert-20m-h200-2026-12-02d", "convert-20m-h200-2026-12-02e"
C02F, C03G, C03I, C04J = "convert-h200-2026-12-02f", "convert-h200-2026-12-03g", "convert-h200-2026-12-03i", "convert-h200-2026-12-04j"
CPU_SIZES = f"{C02E}/layers-1of4-softmax-20M-b128-cpu-sizes.md"  # the matrix's --sizes cpu counts, for an evaluation without its own .md
SMOLLM2_ROWS = (
    Row("original", "original", f"{C02F}/family-2M-cpu-eval.results.jsonl", f"{C02F}/family-2M-cpu-eval.matrix.md",
        census=f"{C02D}/all-gla-all-decay-2M-cpu-eval.results.jsonl"),
    Row("control", "control", f"{C02F}/family-2M-cpu-eval.results.jsonl", f"{C02F}/family-2M-cpu-eval.matrix.md",
        f"{C02D}/conv15.results.jsonl", f"{C02D}/all-gla-all-decay-2M-cpu-eval.results.jsonl"),
    Row("all-gla", "all-gla", f"{C02D}/all-gla-all-decay-2M-cpu-eval.results.jsonl", f"{C02D}/all-gla-all-decay-2M-cpu-sizes.md",
        f"{C02D}/conv15.results.jsonl", f"{C02D}/all-gla-all-decay-2M-cpu-eval.results.jsonl"),
    Row("all-decay", "all-decay", f"{C02D}/all-gla-all-decay-2M-cpu-eval.results.jsonl", f"{C02D}/all-gla-all-decay-2M-cpu-sizes.md",
        f"{C02D}/conv15.results.jsonl", f"{C02D}/all-gla-all-decay-2M-cpu-eval.results.jsonl"),
    Row("all-gated-deltanet", "all-gated-deltanet", f"{C02F}/family-2M-cpu-eval.results.jsonl", f"{C02F}/family-2M-cpu-eval.matrix.md",
        f"{C02F}/conv15.results.jsonl", f"{C02F}/all-gated-deltanet-2M-cpu-census.json"),
    Row("all-kda", "all-kda", f"{C02F}/family-2M-cpu-eval.results.jsonl", f"{C02F}/family-2M-cpu-eval.matrix.md",
        f"{C02F}/conv15.results.jsonl"),
    Row("layers-1of4-softmax-gdn", "layers-1of4-softmax-gdn", f"{C03G}/layers-1of4-softmax-gdn-2M-cpu-eval.results.jsonl",
        f"{C03G}/layers-1of4-softmax-gdn-2M-cpu-eval.matrix.md", f"{C03G}/lane_c.jsonl",
        f"{C03G}/layers-1of4-softmax-gdn-2M-cpu-census.json"),
    Row("sink+window+gdn", "sink+window+gdn", f"{C02F}/family-2M-cpu-eval.results.jsonl", f"{C02F}/family-2M-cpu-eval.matrix.md",
        f"{C02F}/conv15.results.jsonl", f"{C02F}/sink+window+gdn-2M-cpu-census.json"),
    Row("control (20M)", "control", f"{C02C}/control-20M-cpu-eval.results.jsonl", f"{C02C}/control-20M-cpu-sizes.md",
        f"{C02C}/lane_a.results.jsonl"),
    Row("all-hedgehog (20M)", "all-hedgehog", f"{C02F}/all-hedgehog-20M-b128-cpu-eval.results.jsonl", CPU_SIZES,
        f"{C02F}/lane_a.results.jsonl"),
    Row("layers-1of4-softmax (20M)", "layers-1of4-softmax", f"{C02E}/layers-1of4-softmax-20M-b128-cpu-eval.results.jsonl",
        CPU_SIZES, f"{C02E}/lane_b.results.jsonl", f"{C02E}/layers-1of4-softmax-20M-b128-cpu-census.results.jsonl"),
    Row("layers-1of2-softmax (20M)", "layers-1of2-softmax", f"{C02D}/layers-1of2-softmax-20M-cpu-eval.results.jsonl",
        f"{C02D}/layers-1of2-softmax-20M-cpu-sizes.md", f"{C02D}/lane_a.results.jsonl",
        f"{C02E}/layers-1of2-softmax-20M-b32-cpu-census.results.jsonl"),
    Row("window+linear (20M)", "window+linear", f"{C04J}/20M-cpu-eval.jsonl", f"{C04J}/20M-cpu-eval.matrix.md",
        f"{C04J}/machine3-lane_b.jsonl", f"{C04J}/20M-cpu-eval.jsonl"),
    Row("sink+window+linear (20M)", "sink+window+linear", f"{C03I}/20M-cpu-eval.jsonl", f"{C03I}/20M-cpu-eval.matrix.md",
        f"{C03I}/machine3-lane_a.jsonl", f"{C03I}/20M-cpu-census.jsonl"),
)

WINDOW_LINEAR_ROWS = (
    Row("original", "original", f"{C04J}/20M-cpu-eval.jsonl", f"{C04J}/20M-cpu-eval.matrix.md"),
    Row("control (2M)", "control", f"{C04J}/20M-cpu-eval.jsonl", f"{C04J}/20M-cpu-eval.matrix.md", f"{C04J}/machine1-lane_c.jsonl"),
    Row("window+linear (finished, 305 of 305 steps)", "window+linear", f"{C04J}/20M-cpu-eval.jsonl", f"{C04J}/20M-cpu-eval.matrix.md",
        f"{C04J}/machine3-lane_b.jsonl"),
)
C03H = "convert-h200-2026-12-03h"
SINK_WINDOW_LINEAR_ROWS = (
    Row("original", "original", f"{C03I}/20M-cpu-eval.jsonl", f"{C03I}/20M-cpu-eval.matrix.md"),
    Row("control (2M)", "control", f"{C03I}/20M-cpu-eval.jsonl", f"{C03I}/20M-cpu-eval.matrix.md", f"{C03H}/lane_c.jsonl"),
    Row("sink+window+linear (finished, 305 of 305 steps)", "sink+window+linear", f"{C03I}/20M-cpu-eval.jsonl",
        f"{C03I}/20M-cpu-eval.matrix.md", f"{C03I}/machine3-lane_a.jsonl"),
    Row("window+linear (partial: step 250 of 305)", "window+linear", f"{C03I}/20M-cpu-eval.jsonl", f"{C03I}/20M-cpu-eval.matrix.md"),
)


def induction_table(rows: tuple[tuple[str, str, str, str], ...]) -> Callable[[], str]:
    """Induction heads inside converted models with the repeated string's period inside and past their window:
    (label, architecture, census at the default period 50, census at period 128)."""
    def render() -> str:
        lines = [[label, str(last_row(short, "census", architecture)["induction_heads"]),
                  str(last_row(long, "census", architecture)["induction_heads"])] for label, architecture, short, long in rows]
        return table(["row", "induction heads > 0.4, period 50", "period 128"], lines)

    return render


INDUCTION_ROWS = (
    ("original", "original", f"{C03I}/20M-cpu-census.jsonl", f"{C03I}/20M-cpu-census-induction128.jsonl"),
    ("control (2M)", "control", f"{C03I}/20M-cpu-census.jsonl", f"{C03I}/20M-cpu-census-induction128.jsonl"),
    ("sink+window+linear (20M)", "sink+window+linear", f"{C03I}/20M-cpu-census.jsonl", f"{C03I}/20M-cpu-census-induction128.jsonl"),
    ("window+linear (20M)", "window+linear", f"{C04J}/20M-cpu-eval.jsonl", f"{C04J}/20M-cpu-census-induction128.jsonl"),
)


# ---- which heads stay exact -------------------------------------------------------------------------------------
SELECTORS = {"duo": "DuoAttention gates", "fit": "fit error", "razor": "RazorAttention", "retrieval": "retrieval score",
             "random": "random (pooled draws)"}


def budget_table(relative: str, kind: str) -> Callable[[], str]:
    """Selectors x budgets, each cell `passkey correct / NIAH correct` out of n (random draws pooled)."""
    def render() -> str:
        cells = pd.read_parquet(record(f"{relative}/budget.parquet"))
        pooled = cells.groupby(["kind", "selector", "budget", "task"])[["correct", "n"]].sum().reset_index()
        pooled = pooled.set_index(["kind", "selector", "budget", "task"])

        def both(kind_: str, selector: str, budget: float) -> str:
            if (kind_, selector, budget, "passkey") not in pooled.index:
                return "-"
            passkey, niah = (pooled.loc[(kind_, selector, budget, task)] for task in ("passkey", "niah"))
            return f"{int(passkey.correct)} / {int(niah.correct)} of {int(passkey.n)}"

        budgets = sorted(b for b in pooled.loc[kind].index.get_level_values("budget").unique() if 0 < b < 1)
        rows = [[f"{budget * 100:g} %", *(both(kind, selector, budget) for selector in SELECTORS)] for budget in budgets]
        return (table(["KV heads exact", *SELECTORS.values()], rows) + "\n\nReferences: every head exact "
                + both("none", "all-exact", 1.0) + f"; every head `{kind}` " + both(kind, "none-exact", 0.0) + ".")

    return render


def sparse_table(relative: str) -> Callable[[], str]:
    def render() -> str:
        cells = pd.read_parquet(record(f"{relative}/budget.parquet"))
        sparse = cells[cells.selector == "sparse"]
        rows = []
        for kind in sparse.kind.unique():
            row = sparse[sparse.kind == kind].set_index("task")
            rows.append([f"`{kind}`", *(count_cell(row.loc[t, "accuracy"], int(row.loc[t, "n"])) for t in ("passkey", "niah")),
                         f"{row['perplexity'].iloc[0]:.2f}"])
        return table(["sparse rule (every head)", "passkey", "NIAH", "perplexity"], rows)

    return render


# ---- decoding cost ----------------------------------------------------------------------------------------------
DECODE_ROWS = ("original", "all-hedgehog", "all-gated-deltanet")  # the windowed rows' caches predate one copy per KV head


def decode_table(batch1: str, batch8: str, context: int) -> Callable[[], str]:
    def pick(relative: str, architecture: str, mode: str) -> dict:
        rows = json.loads(record(relative).read_text())["rows"]
        return next(r for r in rows if (r["context"], r["architecture"], r["decode_mode"]) == (context, architecture, mode))

    def render() -> str:
        rows = []
        for architecture in DECODE_ROWS:
            graph1, eager1, graph8 = pick(batch1, architecture, "cuda-graph"), pick(batch1, architecture, "eager"), pick(batch8, architecture, "cuda-graph")
            rows.append([architecture, f"{graph1['kv_cache_bytes_measured'] / 1e6:.1f} MB ({graph1['cache_ratio']:.3f}x)",
                         f"{eager1['decode_tokens_per_s']:.1f} ({eager1['decode_speedup']:.2f}x)",
                         f"{graph1['decode_tokens_per_s']:.1f} ({graph1['decode_speedup']:.2f}x)",
                         f"{graph8['decode_tokens_per_s']:.1f} ({graph8['decode_speedup']:.2f}x)"])
        return table(["architecture", f"cache at {context:,} tokens", "decode tok/s, eager, batch 1",
                      "CUDA graph, batch 1", "CUDA graph, batch 8"], rows)

    return render


def decode_rows_table(relative: str) -> Callable[[], str]:
    """Every row of one decode_bench.json, as the benchmark measured it."""
    def render() -> str:
        rows = []
        for r in json.loads(record(relative).read_text())["rows"]:
            equal = r.get("tokens_equal_eager")
            rows.append([r["context"], r["decode_mode"], r["architecture"], r["weights"], f"{r['kv_cache_bytes_measured'] / 1e6:.2f}",
                         f"{r['cache_ratio']:.3f}", f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_speedup']:.2f}",
                         f"{r['prefill_ms']:.1f}", f"{r['peak_memory_bytes'] / 1e6:.1f}", "" if equal is None else f"{equal:.2f}"])
        return table(["context", "mode", "architecture", "weights", "cache MB", "cache / original", "decode tok/s", "speed-up",
                      "prefill ms", "peak MB", "tokens = eager"], rows)

    return render


# ---- stage-2 throughput -----------------------------------------------------------------------------------------
def throughput_table(*relatives: str) -> Callable[[], str]:
    def render() -> str:
        rows = []
        for relative in relatives:
            t = json.loads(record(relative).read_text())
            control, hedgehog = t["control/end_to_end"], t["all-hedgehog/end_to_end"]
            rows.append([t["batch"], f"{control['tokens_per_s']:,.0f}", f"{control['mfu'] * 100:.1f} %", f"{hedgehog['tokens_per_s']:,.0f}",
                         f"{hedgehog['mfu'] * 100:.1f} %", f"{t['all-hedgehog/transfer']['tokens_per_s']:,.0f}",
                         f"{max(t['control/peak_gib'], t['all-hedgehog/peak_gib']):.1f}"])
        return table(["batch", "control tokens/s", "control MFU", "all-hedgehog stage 2 tokens/s", "MFU",
                      "all-hedgehog stage 1 tokens/s", "peak GiB"], rows)

    return render


def stage2_matrix_table(*relatives: str) -> Callable[[], str]:
    """Every row of convert_bench.py --matrix records (.jsonl), in order: tokens/s, MFU, memory, phase shares."""
    phases = ("teacher forward", "student forward", "loss", "backward", "optimizer")

    def render() -> str:
        rows = []
        for relative in relatives:
            for r in map(json.loads, filter(str.strip, record(relative).read_text().splitlines())):
                head = [r["model"], r["row"], str(r["length"]), r["path"], relative.split("/")[-2]]
                if "error" in r:
                    rows.append(head + ["", r["error"], "", "", ""])
                    continue
                share = r["phase_share"]
                rows.append(head + [f"{r['micro_batch'] * r['length']:,}", f"{r['tokens_per_s']:,.0f}", f"{r['mfu'] * 100:.1f} %",
                                    f"{r['peak_memory_gb']:.1f}", " / ".join(f"{100 * share[p]:.0f}" for p in phases)])
        return table(["model", "row", "T", "path", "record", "tokens per forward", "tokens/s", "MFU", "peak GiB",
                      "% teacher / student / loss / backward / optimizer"], rows)

    return render


# ---- multi-query associative recall per kernel family -----------------------------------------------------------
def mqar_table(relative: str) -> Callable[[], str]:
    """benchmarks/mqar.py's record: per family and head dimension, accuracy on its fresh test sequences (one query
    each, so a Wilson interval) at each number of stored pairs."""
    def render() -> str:
        found = json.loads(record(relative).read_text())
        pairs = found[0]["pairs"]
        rows = []
        for r in found:
            n = r["test_sequences"]
            cells = []
            for accuracy in r["accuracy"]:
                correct = round(accuracy * n)  # a float32 mean: within 1e-3 of a whole count
                if abs(correct - accuracy * n) > 1e-3:
                    raise ValueError(f"accuracy {accuracy} is not a whole number of {n} samples")
                low, high = wilson_interval(correct, n)
                cells.append(f"{correct / n:.2f} ({low:.2f}-{high:.2f})")
            rows.append([r["family"], str(r["dim"]), *cells])
        return table(["family", "d", *(f"{p} pairs" for p in pairs)], rows)

    return render


# ---- flash-linear-attention against our torch forms ------------------------------------------------------------
def families_table(relative: str) -> Callable[[], str]:
    def number(value) -> str:
        if isinstance(value, str):
            return value
        return "refused by fla" if math.isinf(value) else f"{value:.1e}"

    def render() -> str:
        found = json.loads(record(relative).read_text())
        timing = {(t["family"], t["length"]): t for t in found["timing"]}
        lengths = sorted({t["length"] for t in found["timing"]})
        rows = []
        for parity in found["parity"]:
            family = parity["family"]
            rows.append([family, f"{number(parity['fp32'])} / {number(parity['bf16'])}", number(parity["backward"]),
                         *(f"{timing[(family, n)]['fla_ms']:.1f} / {timing[(family, n)]['sdpa_ms']:.1f}" for n in lengths)])
        return table(["family", "forward at 2K, max abs error fp32 / bf16", "backward, bf16 (relative)",
                      *(f"prefill {n:,}: fla / SDPA ms" for n in lengths)], rows)

    return render


# ---- grouped-query SDPA memory ----------------------------------------------------------------------------------
def gqa_table(relative: str) -> Callable[[], str]:
    def render() -> str:
        rows = json.loads(record(relative).read_text())["rows"]
        by = {(r["form"], r["length"]): r for r in rows}
        lines = []
        for length in sorted({r["length"] for r in rows}):
            grouped, expanded = by[("enable_gqa", length)], by[("expanded", length)]
            lines.append([f"{length:,}", f"{grouped['peak_extra_gib']:.2f} GiB, {grouped['ms']:.0f} ms",
                          f"{expanded['peak_extra_gib']:.2f} GiB, {expanded['ms']:.0f} ms", f"{expanded['max_abs_difference']:.1e}"])
        return table(["tokens", "`enable_gqa`", "KV heads repeated (`expand_kv_heads`)", "max abs difference"], lines)

    return render


# ---- the registry -----------------------------------------------------------------------------------------------
CENSUS_RUNS = {
    "SmolLM2-135M-Instruct (CPU)": ("census-smollm2-cpu",),
    # Qwen's massive rows measured again on the CPU under the onset rule (64 sequences, fp32)
    "Qwen2.5-Coder-0.5B (H200; massive rows CPU)": ("qwen-h200-2026-12-03/census", "qwen-massive-cpu-2026-12-07"),
}

TABLES: dict[str, Callable[[], str]] = {
    "census": census_table(CENSUS_RUNS),
    "qwen-masking": masking_table("qwen-h200-2026-12-03/sweep"),
    "qwen-conversions": conversion_table(QWEN_ROWS),
    "smollm2-conversions": conversion_table(SMOLLM2_ROWS, with_census=True),
    "induction-period": induction_table(INDUCTION_ROWS),
    "budget-streaming": budget_table("budget-smollm2-h200", "sink+window:sinks=64,window=256"),
    "budget-hedgehog": budget_table("budget-smollm2-hedgehog-cpu", "hedgehog"),
    "budget-sparse": sparse_table("budget-smollm2-h200"),
    "decode": decode_table("decode-h200-2026-12-02f/batch1/decode_bench.json", "decode-h200-2026-12-02f/batch8/decode_bench.json", 32768),
    "window-linear-20m": conversion_table(WINDOW_LINEAR_ROWS),
    "sink-window-linear-20m": conversion_table(SINK_WINDOW_LINEAR_ROWS),
    "decode-batch1": decode_rows_table("decode-h200-2026-12-02f/batch1/decode_bench.json"),
    "decode-batch8": decode_rows_table("decode-h200-2026-12-02f/batch8/decode_bench.json"),
    "throughput": throughput_table("convert-20m-h200-2026-12-02e/throughput-b32.json", "convert-20m-h200-2026-12-02e/throughput-b128.json"),
    "fla-families": families_table("convert-families-h200-2026-12-02c/gpu_families.json"),
    "gqa-sdpa": gqa_table("gqa-sdpa-h200-2026-12-04/gqa_sdpa_memory.json"),
    "mqar": mqar_table("mqar-cpu-2026-12-07/mqar.json"),
    "stage2-h100": stage2_matrix_table(*(f"stage2-h100-2026-12-07/{part}/convert_bench.jsonl"
                                         for part in ("a-micro16k", "b-profile-micro16k", "c-micro64k"))),
}


def render(text: str, tables: dict[str, Callable[[], str]] | None = None) -> str:
    """`text` with every marked table rendered again from its records (an unknown name is an error)."""
    tables = TABLES if tables is None else tables

    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in tables:
            raise KeyError(f"table '{name}' is not registered in benchmarks/render_tables.py")
        return f"<!-- table:{name} -->\n{tables[name]()}\n<!-- /table:{name} -->"

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = False
    for document in DOCUMENTS:
        text = document.read_text()
        fresh = render(text)
        if fresh == text:
            continue
        stale = True
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True), str(document), "rendered"))
        else:
            document.write_text(fresh)
            print(f"rewrote {document.relative_to(ROOT)}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
