"""The training-token ladder (issue 42): several `attnprobe convert` runs of the same rows at different stage-2
budgets, with and without retrieval-bearing data, read into one table and drawn as recall against tokens.

    table = ladder_table([Path("runs/r2M"), Path("runs/r20M"), Path("runs/r200M")])
    fig = recall_vs_tokens(table)        # a panel per recall task, and perplexity against the control

Each run's matrix.parquet gives the rows' numbers, each row's conversions/NAME/conversion.json what it trained on:
the budget, the recipe's ce_weight, and the retrieval documents mixed into its data. A head-level hybrid row
(`attnprobe convert --selector S --kv-budget B --family F`) also gets its family, selector, random draw and KV-head
share, read from its name (`hybrid_name`); hybrid_budget.py draws those rows against their share.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from attnprobe.errors import AttnprobeError
from attnprobe.probe.rundir import read_json, readable

from attnprobe.analyses import tasks as recall_tasks
from attnprobe.analyses.conversion.config import format_tokens
from attnprobe.analyses.conversion.head_hybrid import FAMILIES, SELECTORS
from attnprobe.analyses.presentation import style
from attnprobe.analyses.presentation.figures import require
from attnprobe.analyses.presentation.style import styled

ORIGINAL, CONTROL = "original", "control"
HYBRID_COLUMNS = ["family", "selector", "draw", "kv_share"]
TRAINING_COLUMNS = ["stage2_tokens", "transfer_tokens", "retrieval_fraction", "retrieval_stages", "ce_weight"]
RESULT_COLUMNS = ["perplexity", "ppl_vs_control", "gate"]
INTERVAL_SUFFIXES = ("_acc", "_ci_low", "_ci_high", "_n")
CONTROL_COLOR = style.SELECTION_COLORS["random"]  # the frontier figure draws controls in it too
ARCHITECTURE_COLORS = [color for color in sns.color_palette("colorblind") if color != CONTROL_COLOR]
STAGE_WORDS = {"1": "stage 1", "2": "stage 2", "both": "both stages"}


# ----------------------------------------------------------------------------- the table

def ladder_table(runs: Sequence[Path]) -> pd.DataFrame:
    """One row per (run, architecture): the run's matrix numbers beside what the row trained on, so rungs of
    different budgets and data line up. Runs of different models are refused: their rows would not compare."""
    if not runs:
        raise AttnprobeError("name the convert runs of the ladder: attnprobe ladder RUN [RUN ...] --out DIR")
    runs = [Path(run) for run in runs]
    named_twice = next((run for index, run in enumerate(runs) if run.resolve() in {r.resolve() for r in runs[:index]}), None)
    if named_twice is not None:
        raise AttnprobeError(f"{named_twice} is named twice: give each run of the ladder once")
    tables, models = [], {}
    for run in runs:
        matrix = _matrix(run)
        manifests = {name: _conversion(run, name) for name in matrix["architecture"] if name != ORIGINAL}
        models[run] = _model_of(run, manifests)
        training = pd.DataFrame([_training(manifests.get(name)) for name in matrix["architecture"]], index=matrix.index)
        tables.append(pd.concat([pd.DataFrame({"run": str(run), "architecture": matrix["architecture"]}),
                                 hybrid_columns(matrix), training,
                                 matrix[_accuracy_columns(matrix)], matrix.reindex(columns=RESULT_COLUMNS)], axis=1))
    _same_model(models)
    table = pd.concat(tables, ignore_index=True)
    ordered = ["run", "architecture", *HYBRID_COLUMNS, *TRAINING_COLUMNS, *_accuracy_columns(table), *RESULT_COLUMNS]
    return table[ordered].astype({"stage2_tokens": "int64", "transfer_tokens": "int64", "retrieval_stages": "str",
                                  "family": "str", "selector": "str", "draw": "Int64", "kv_share": "float64"})


def _matrix(run: Path) -> pd.DataFrame:
    path = run / "matrix.parquet"
    fix = f"run `attnprobe convert --part evaluate --out {run}` (with the run's options) to write it"
    if not run.is_dir():
        raise AttnprobeError(f"run directory {run} not found: pass folders that `attnprobe convert` wrote")
    if not path.is_file():
        raise AttnprobeError(f"{path} not found: {fix}")
    try:
        matrix = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several kinds of errors on a damaged file
        raise AttnprobeError(f"{path} is unreadable ({type(error).__name__}): {fix} again") from None
    if "architecture" not in matrix.columns or matrix.empty or not _accuracy_columns(matrix):
        raise AttnprobeError(f"{path} holds no architecture rows with recall accuracies: {fix} again")
    return matrix.reset_index(drop=True)


def _accuracy_columns(table: pd.DataFrame) -> list[str]:
    """Every task's accuracy, interval and n (`<column>_acc`, `_ci_low`, `_ci_high`, `_n`), task by task."""
    tasks = [column.removesuffix("_acc") for column in table.columns if column.endswith("_acc")]
    return [f"{task}{suffix}" for task in tasks for suffix in INTERVAL_SUFFIXES if f"{task}{suffix}" in table.columns]


def _conversion(run: Path, name: str) -> dict:
    """A row's conversion manifest, read from the run itself (the matrix's `conversion` path may be another machine's)."""
    path = run / "conversions" / name / "conversion.json"
    if not path.is_file():
        raise AttnprobeError(f"{path} not found: the ladder reads what row {name} trained on from it; copy the run's "
                             "conversions/ folder with its matrix")
    manifest = read_json(path) if readable(path) else None
    whole = isinstance(manifest, dict) and isinstance(manifest.get("data"), dict) and \
        {"tokens", "transfer_tokens"} <= set(manifest.get("budget", {})) and "ce_weight" in manifest.get("config", {})
    if not whole:
        raise AttnprobeError(f"{path} is damaged: rerun the same `attnprobe convert --out {run}` to make it again")
    return manifest


def _training(manifest: dict | None) -> dict:
    """What a row trained on; the original trained on nothing. A row finished from a checkpoint records its data's
    hash only, so whether that data held retrieval documents is unknown (NaN), not 0."""
    if manifest is None:
        return {"stage2_tokens": 0, "transfer_tokens": 0, "retrieval_fraction": 0.0, "retrieval_stages": None,
                "ce_weight": math.nan}
    retrieval = manifest["data"].get("retrieval")
    fraction = retrieval["fraction"] if retrieval else math.nan if "partial" in manifest else 0.0
    return {"stage2_tokens": manifest["budget"]["tokens"], "transfer_tokens": manifest["budget"]["transfer_tokens"],
            "retrieval_fraction": float(fraction), "retrieval_stages": retrieval["stages"] if retrieval else None,
            "ce_weight": float(manifest["config"]["ce_weight"])}


def _model_of(run: Path, manifests: dict[str, dict]) -> dict[str, str]:
    """{"weights": hash, "model": id} as far as the run records them: manifest.json (written when a whole convert
    evaluates) or its conversion manifests (a run evaluated by parts may have only these)."""
    run_manifest = read_json(run / "manifest.json") if readable(run / "manifest.json") else {}
    found = {"weights": run_manifest.get("weights_sha256"), "model": run_manifest.get("model_id")}
    for manifest in manifests.values():
        found["weights"] = found["weights"] or manifest.get("model_hash")
        found["model"] = found["model"] or manifest.get("model_id")
    return {key: value for key, value in found.items() if value}


def _same_model(models: dict[Path, dict[str, str]]) -> None:
    """Weights decide where every run records them (one model may be named by a hub id and by a local path)."""
    keys = ("weights",) if all("weights" in found for found in models.values()) else ("weights", "model")
    for key in keys:
        known = [(run, found[key]) for run, found in models.items() if key in found]
        other = next(((run, value) for run, value in known if value != known[0][1]), None)
        if other is not None:
            shown = [value[:12] if key == "weights" else value for value in (known[0][1], other[1])]
            raise AttnprobeError(f"{known[0][0]} and {other[0]} are runs of different models ({key} {shown[0]} and "
                                 f"{shown[1]}): a ladder compares conversions of one model")


# ----------------------------------------------------------------------------- head-level hybrid rows

@dataclass(frozen=True)
class HybridName:
    """A head-level hybrid row's name read back: `hybrid-{family}-{selector}[-draw{draw}]-{budget}` (HeadHybrid.name,
    '%' written 'pct'). `budget` is as given to --kv-budget: '12.5%', a share '0.125', or a count '11'."""

    family: str
    selector: str
    draw: int | None  # which random order; None for every other selector
    budget: str

    @property
    def is_count(self) -> bool:
        return self.budget.isdigit()

    def kv_share(self, total_kv_heads: int | None = None) -> float:
        """The share of the model's KV heads kept exact: the budget's own share where it names one ('12.5%' ->
        0.125, '0.125' -> 0.125, as written, not rounded to whole heads), count / total for a count (NaN when the
        total is unknown)."""
        if self.budget.endswith("%"):
            return float(self.budget[:-1]) / 100
        if not self.is_count:
            return float(self.budget)
        return int(self.budget) / total_kv_heads if total_kv_heads else math.nan


def _alternatives(names: Sequence[str]) -> str:
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


_HYBRID_NAME = re.compile(rf"hybrid-(?P<family>{_alternatives(FAMILIES)})-(?P<selector>{_alternatives(SELECTORS)})"
                          r"(?:-draw(?P<draw>\d+))?-(?P<budget>\d+(?:\.\d+)?pct|\d+|\d*\.\d+)")
_KV_TOTAL = re.compile(r"\b(\d+) of (\d+) KV heads\b")


def hybrid_name(name: str) -> HybridName | None:
    """A hybrid row's family, selector, draw and budget, or None for any other row (the original, the control, whole
    architectures). Only head_hybrid's FAMILIES and SELECTORS are read, so a new one is read once it is listed there."""
    found = _HYBRID_NAME.fullmatch(str(name))
    if found is None or (found["draw"] is not None) != (found["selector"] == "random"):
        return None
    return HybridName(found["family"], found["selector"], None if found["draw"] is None else int(found["draw"]),
                      found["budget"].replace("pct", "%"))


def total_kv_heads(description: object) -> int | None:
    """The model's KV heads as a hybrid row's matrix `description` records them ('11 of 90 KV heads softmax by
    retrieval, the rest gated-deltanet' -> 90; head_hybrid.variant writes it). Neither the conversion manifest (it
    lists the converted query heads, not the model's KV heads) nor another matrix column records the total."""
    found = _KV_TOTAL.search(description) if isinstance(description, str) else None
    return int(found[2]) if found else None


def hybrid_columns(matrix: pd.DataFrame) -> pd.DataFrame:
    """`family`, `selector`, `draw` and `kv_share` of each matrix row: None / NaN for a row that is no head-level
    hybrid. `kv_share` is the share the name's budget gives ('12.5pct' -> 0.125); a count budget ('11') is divided
    by the model's KV heads from the row's `description` (`total_kv_heads`), NaN where the matrix has none."""
    descriptions = matrix["description"] if "description" in matrix.columns else pd.Series(None, index=matrix.index)
    rows = []
    for name, description in zip(matrix["architecture"], descriptions):
        parsed = hybrid_name(name)
        if parsed is None:
            rows.append({"family": None, "selector": None, "draw": None, "kv_share": math.nan})
            continue
        total = total_kv_heads(description) if parsed.is_count else None
        rows.append({"family": parsed.family, "selector": parsed.selector, "draw": parsed.draw,
                     "kv_share": parsed.kv_share(total)})
    return pd.DataFrame(rows, index=matrix.index, columns=HYBRID_COLUMNS).astype({"draw": "Int64", "kv_share": "float64"})


# ----------------------------------------------------------------------------- printing

def summary(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the CLI prints it: a run's folder name, tokens as 2M, accuracies as percentages."""
    shown = pd.DataFrame({"run": table["run"].map(lambda run: Path(run).name), "architecture": table["architecture"],
                          "stage2": table["stage2_tokens"].map(token_label),
                          "retrieval": table["retrieval_fraction"].map(lambda f: "?" if pd.isna(f) else f"{f:.0%}")})
    for column in [c for c in table.columns if c.endswith("_acc")]:
        shown[column.removesuffix("_acc")] = table[column].map(lambda value: "–" if pd.isna(value) else f"{value:.0%}")
    shown["ppl/control"] = table["ppl_vs_control"].map(lambda value: "–" if pd.isna(value) else f"{value:.3f}")
    shown["gate"] = table["gate"].map(lambda gate: "–" if pd.isna(gate) else gate)
    return shown


def token_label(count: float) -> str:
    """2097152 -> '2M'; a count with no exact suffix is shown to three digits ('1.95M')."""
    exact = format_tokens(int(count))
    if not exact.isdigit() or count < 1 << 10:
        return exact
    size, suffix = next((size, suffix) for suffix, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)) if count >= size)
    return f"{count / size:.3g}{suffix}"


# ----------------------------------------------------------------------------- the figure

def _series(table: pd.DataFrame) -> list[tuple[str, dict, pd.DataFrame]]:
    """(legend label, line style, rows by tokens) per architecture and training data: colour by architecture,
    solid with retrieval documents, dashed without, dotted where unknown; the CE weight named where it varies."""
    trained = table[table["architecture"] != ORIGINAL]
    keys = ["architecture", "retrieval_fraction", "retrieval_stages", "ce_weight"]
    varied_ce = trained["ce_weight"].nunique() > 1
    names = [name for name in dict.fromkeys(trained["architecture"]) if name != CONTROL]
    colors = {name: ARCHITECTURE_COLORS[index % len(ARCHITECTURE_COLORS)] for index, name in enumerate(names)}
    series = []
    for (name, fraction, stages, ce_weight), rows in trained.groupby(keys, dropna=False, sort=False):
        label = name
        if pd.isna(fraction):
            label, linestyle = f"{label}, retrieval data unknown", ":"
        elif fraction > 0:
            label, linestyle = f"{label}, retrieval {fraction:.0%} ({STAGE_WORDS.get(stages, stages)})", "-"
        else:
            linestyle = "--"
        if varied_ce:
            label += f", CE {ce_weight:g}"
        line = {"color": colors.get(name, CONTROL_COLOR), "linestyle": linestyle, "marker": "o"}
        series.append((label, line, rows.sort_values("stage2_tokens")))
    return series


def _n_text(table: pd.DataFrame, column: str) -> str:
    """'n = 100' where every point has the same number of samples, else the range."""
    counts = table.loc[table[f"{column}_acc"].notna(), f"{column}_n"].dropna().astype(int) \
        if f"{column}_n" in table.columns else pd.Series(dtype=int)
    if counts.empty:
        return "n unknown"
    low, high = counts.min(), counts.max()
    return f"n = {low}" if low == high else f"n = {low}–{high}"


def _token_axis(ax, tokens: Sequence[int]) -> None:
    """Log scale with a tick at each budget of the ladder; symlog when a row trained no stage-2 tokens."""
    positive = [t for t in tokens if t > 0]
    if positive and len(positive) < len(tokens):
        ax.set_xscale("symlog", linthresh=min(positive))
    elif positive:
        ax.set_xscale("log")
    ax.set_xticks(list(tokens), [token_label(t) for t in tokens])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _accuracy_panel(ax, table: pd.DataFrame, column: str, title: str) -> None:
    for label, line, rows in _series(table):
        ax.plot(rows["stage2_tokens"], rows[f"{column}_acc"], label=label, **line)
        if f"{column}_ci_low" in rows.columns:
            below = (rows[f"{column}_acc"] - rows[f"{column}_ci_low"]).clip(lower=0)
            above = (rows[f"{column}_ci_high"] - rows[f"{column}_acc"]).clip(lower=0)
            ax.errorbar(rows["stage2_tokens"], rows[f"{column}_acc"], yerr=[below, above], fmt="none",
                        ecolor=line["color"], elinewidth=0.8, capsize=0)
    original = table[(table["architecture"] == ORIGINAL) & table[f"{column}_acc"].notna()]
    if not original.empty:  # the same model in every run: its mean, the band spanning every run's interval
        ax.axhline(float(original[f"{column}_acc"].mean()), color="black", linestyle=":", linewidth=1.0, label=ORIGINAL)
        if f"{column}_ci_low" in original.columns:
            ax.axhspan(original[f"{column}_ci_low"].min(), original[f"{column}_ci_high"].max(), color="black", alpha=0.07, lw=0)
    ax.set_title(f"{title} ({_n_text(table, column)})")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("accuracy")


def _perplexity_panel(ax, table: pd.DataFrame) -> None:
    for label, line, rows in _series(table):
        ax.plot(rows["stage2_tokens"], rows["ppl_vs_control"], label=label, **line)
    ax.set_title("perplexity relative to the control")
    ax.set_ylabel("perplexity / control's")


@styled
def task_panels(panels: int, row_height: float, extra_height: float) -> tuple[Figure, list]:
    """A figure of `panels` axes, three to a row (the ladder's and the hybrid budget's task panels)."""
    width = min(3, panels)
    rows = math.ceil(panels / width)
    fig = style.new_figure("full", height=row_height * rows + extra_height)
    axes = list(fig.subplots(rows, width, squeeze=False).flat)
    for extra in axes[panels:]:
        extra.remove()
    return fig, axes[:panels]


def recall_vs_tokens(table: pd.DataFrame) -> Figure:
    """Recall against stage-2 training tokens: a panel per recall task (bars: 95 % intervals; dotted line and band:
    the original), and one of perplexity relative to each run's control; a line per architecture and training data."""
    require(table, ["run", "architecture", *TRAINING_COLUMNS, "ppl_vs_control"], "ladder.parquet")
    labels = {task.column: task.label for task in recall_tasks.tasks()}
    columns = [c.removesuffix("_acc") for c in table.columns if c.endswith("_acc") and table[c].notna().any()]
    if not columns or table["architecture"].eq(ORIGINAL).all():
        raise AttnprobeError("ladder.parquet holds no converted row with a recall accuracy: rebuild it with attnprobe ladder")
    panels = len(columns) + 1
    width = min(3, panels)
    fig, axes = task_panels(panels, 1.9, 0.9)
    tokens = sorted(set(table.loc[table["architecture"] != ORIGINAL, "stage2_tokens"].astype(int)))
    for ax, column in zip(axes, columns):
        _accuracy_panel(ax, table, column, labels.get(column, column))
    _perplexity_panel(axes[len(columns)], table)
    for index, ax in enumerate(axes[:panels]):
        _token_axis(ax, tokens)
        if index + width >= panels:  # no panel below this one
            ax.set_xlabel("stage-2 training tokens")
        sns.despine(ax=ax)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=2 if max(map(len, names)) > 30 else 3, fontsize="small")
    fig.suptitle("Recall against stage-2 training tokens\n(bars: 95 % intervals; solid: with retrieval data, dashed: without)")
    return fig
