"""Head-level hybrids against their KV-head budget (issue 43): the rows of `attnprobe convert --selector S
--kv-budget B --family F`, gathered by `attnprobe ladder`, drawn as recall against the share of KV heads kept
exact at one stage-2 budget. It is budget_curve's sibling: there the other heads are replaced without training,
here they are converted and trained.

    table = ladder_table([Path("runs/hybrid-2pct"), Path("runs/hybrid-12.5pct")])
    fig = hybrid_budget_curve(table)                 # at the largest stage-2 budget of the hybrid rows
    fig = hybrid_budget_curve(table, tokens=20 << 20)

The table's `family`, `selector`, `draw` and `kv_share` columns (ladder.hybrid_columns) place each row.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from attnprobe.errors import AttnprobeError

from attnprobe.analyses import tasks as recall_tasks
from attnprobe.analyses.conversion.head_hybrid import FAMILIES, SELECTORS
from attnprobe.analyses.presentation import style
from attnprobe.analyses.presentation.figures import require
from attnprobe.analyses.presentation.ladder import (ARCHITECTURE_COLORS, CONTROL, HYBRID_COLUMNS, ORIGINAL, STAGE_WORDS,
                                                    _n_text, hybrid_name, task_panels, token_label)
from attnprobe.analyses.presentation.style import styled

# colour by selector, as budget_curve does (random in its grey), line style by family
SELECTOR_COLORS = {**{selector: ARCHITECTURE_COLORS[index % len(ARCHITECTURE_COLORS)]
                      for index, selector in enumerate(s for s in SELECTORS if s != "random")},
                   "random": style.SELECTION_COLORS["random"]}
FAMILY_LINESTYLES = ("-", "--", "-.", (0, (1, 1)), (0, (5, 1, 1, 1, 1, 1)))
RETRIEVAL_MARKERS = ("o", "s", "^", "D", "v")
POINT_COLUMNS = ["kv_share", "y", "low", "high", "draws", "lowest", "highest"]


def holds_hybrids(table: pd.DataFrame) -> bool:
    """Whether ladder.parquet holds head-level hybrid rows (by their names, so a ladder written before the hybrid
    columns existed still counts, and the figure names what it lacks)."""
    return "architecture" in table.columns and any(hybrid_name(name) is not None for name in table["architecture"])


def family_linestyle(family: str):
    """head_hybrid's families in order: solid, dashed, dash-dot; a family not listed there gets the next."""
    index = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
    return FAMILY_LINESTYLES[index % len(FAMILY_LINESTYLES)]


def share_label(share: float) -> str:
    """0.125 -> '12.5%', 11/90 -> '12.2%'."""
    return f"{share * 100:.3g}%"


# ----------------------------------------------------------------------------- the points

def _pooled(rows: pd.DataFrame, task: str | None, column: str) -> tuple[float, float, float]:
    """(value, 95 % low, high) of rows that are the same conversion (one draw, one budget): a single row's own
    interval; several (the same row in several runs) pooled, with a Wilson interval over their samples."""
    from attnprobe.analyses.stats import wilson_interval

    if task is None:
        return float(rows[column].mean()), math.nan, math.nan
    if len(rows) == 1:
        bounds = [rows[f"{task}{end}"].iloc[0] if f"{task}{end}" in rows.columns else math.nan for end in ("_ci_low", "_ci_high")]
        return float(rows[column].iloc[0]), float(bounds[0]), float(bounds[1])
    n = rows[f"{task}_n"] if f"{task}_n" in rows.columns else None
    if n is None or n.isna().any():
        return float(rows[column].mean()), math.nan, math.nan
    correct, total = int((rows[column] * n).round().sum()), int(n.sum())
    return (correct / total, *wilson_interval(correct, total))


def _points(rows: pd.DataFrame, task: str | None, column: str) -> pd.DataFrame:
    """Per KV-head share: the value with its 95 % interval, the draws behind it and their range. Several random
    draws give their mean and a t interval over the draws' values (the spread between draws counts)."""
    from attnprobe.analyses.stats import mean_interval

    rows = rows[rows[column].notna()]
    points = []
    for share, at in rows.groupby("kv_share", sort=True):
        per_draw = [_pooled(group, task, column) for _, group in at.groupby(at["draw"].fillna(-1), sort=True)]
        values = [value for value, _, _ in per_draw]
        if len(values) > 1:
            value, low, high = mean_interval(values) if task is not None else (sum(values) / len(values), math.nan, math.nan)
        else:
            value, low, high = per_draw[0]
        points.append({"kv_share": share, "y": value, "low": low, "high": high, "draws": len(values),
                       "lowest": min(values), "highest": max(values)})
    return pd.DataFrame(points, columns=POINT_COLUMNS)


def _retrieval_words(fraction: float, stages) -> str:
    if pd.isna(fraction):
        return "retrieval data unknown"
    return f"retrieval {fraction:.0%} ({STAGE_WORDS.get(stages, stages)})" if fraction > 0 else "no retrieval data"


def _series(rows: pd.DataFrame) -> list[tuple[str, dict, pd.DataFrame]]:
    """(legend label, line style, rows) per family, selector and training data, in head_hybrid's order."""
    families = list(dict.fromkeys(rows["family"]))
    data = list(dict.fromkeys(map(_retrieval_words, rows["retrieval_fraction"], rows["retrieval_stages"])))
    markers = {words: RETRIEVAL_MARKERS[index % len(RETRIEVAL_MARKERS)] for index, words in enumerate(data)}
    order = {"family": FAMILIES, "selector": SELECTORS}
    ordered = rows.sort_values(["family", "selector"], kind="stable", key=lambda column: column.map(
        lambda name: order[column.name].index(name) if name in order[column.name] else len(order[column.name])))
    series = []
    for (family, selector, fraction, stages), group in ordered.groupby(
            ["family", "selector", "retrieval_fraction", "retrieval_stages"], dropna=False, sort=False):
        draws = sorted(int(draw) for draw in group["draw"].dropna().unique())
        label = selector
        if selector == "random":
            label = f"random ({len(draws)} draws)" if len(draws) > 1 else f"random (draw {draws[0]})" if draws else "random"
        if len(families) > 1:
            label += f", {family}"
        if len(data) > 1:
            label += f", {_retrieval_words(fraction, stages)}"
        line = {"color": SELECTOR_COLORS.get(selector, "black"), "linestyle": family_linestyle(family),
                "marker": markers[_retrieval_words(fraction, stages)]}
        series.append((label, line, group))
    return series


# ----------------------------------------------------------------------------- the panels

def _draw(ax, label: str, line: dict, points: pd.DataFrame, bars: bool, random: bool) -> None:
    """A line through the points; a lone random draw as points only; several draws with their range as a band."""
    alone = random and not (points["draws"] > 1).any()
    ax.plot(points["kv_share"], points["y"], label=label, **{**line, "linestyle": "none" if alone else line["linestyle"]})
    if bars and points["low"].notna().any():
        below = (points["y"] - points["low"]).clip(lower=0).fillna(0)
        above = (points["high"] - points["y"]).clip(lower=0).fillna(0)
        ax.errorbar(points["kv_share"], points["y"], yerr=[below, above], fmt="none", ecolor=line["color"],
                    elinewidth=0.8, capsize=2)
    spread = points[points["draws"] > 1]
    if not spread.empty:
        xs, lowest, highest = list(spread["kv_share"]), list(spread["lowest"]), list(spread["highest"])
        if len(xs) == 1:  # one budget: a narrow box, so the band shows
            width = 0.012 * max(ax.get_xlim()[1], xs[0])
            xs, lowest, highest = [xs[0] - width, xs[0] + width], lowest * 2, highest * 2
        ax.fill_between(xs, lowest, highest, color=line["color"], alpha=0.2, lw=0, gid=f"band: {label}")


def _references(ax, originals: pd.DataFrame, controls: pd.DataFrame, column: str, varied: bool) -> None:
    """The original and the control as horizontal lines (a control per training data where that varies)."""
    if not originals.empty and originals[column].notna().any():
        ax.axhline(float(originals[column].mean()), color="black", linestyle=":", linewidth=1.0, label=ORIGINAL)
    for (fraction, stages), rows in controls.groupby(["retrieval_fraction", "retrieval_stages"], dropna=False, sort=False):
        if rows[column].notna().any():
            label = f"{CONTROL}, {_retrieval_words(fraction, stages)}" if varied else CONTROL
            ax.axhline(float(rows[column].mean()), color="black", linestyle="--", linewidth=0.8, alpha=0.7, label=label)


def _share_axis(ax, shares: Sequence[float]) -> None:
    """Linear, as budget_curve's, from none kept; a tick at each budget of the hybrid rows."""
    ax.set_xlim(0, max(shares) * 1.1)
    ax.set_xticks(list(shares), [share_label(share) for share in shares])


# ----------------------------------------------------------------------------- the figure

def _chosen(table: pd.DataFrame, tokens: int | None) -> tuple[int, pd.DataFrame]:
    """The stage-2 budget drawn and the hybrid rows trained on it that have a KV-head share."""
    hybrids = table[table["family"].notna()]
    if hybrids.empty:
        raise AttnprobeError("ladder.parquet holds no head-level hybrid rows (attnprobe convert --selector ... --kv-budget ...)")
    budgets = sorted(set(hybrids["stage2_tokens"].astype(int)))
    tokens = budgets[-1] if tokens is None else int(tokens)
    if tokens not in budgets:
        raise AttnprobeError(f"no hybrid row of ladder.parquet trained {token_label(tokens)} stage-2 tokens: "
                             f"choose {', '.join(token_label(budget) for budget in budgets)}")
    rows = hybrids[(hybrids["stage2_tokens"] == tokens) & hybrids["kv_share"].notna()]
    if rows.empty:
        raise AttnprobeError("the hybrid rows' KV-head budgets are counts of an unknown total: rebuild ladder.parquet "
                             "with attnprobe ladder from runs whose matrix.parquet has the rows' descriptions")
    return tokens, rows


@styled
def hybrid_budget_curve(table: pd.DataFrame, tokens: int | None = None) -> Figure:
    """Recall against the share of KV heads kept exact, the rest converted, at one stage-2 budget (`tokens`, default
    the largest of the hybrid rows): a panel per recall task (bars: 95 % intervals) and one of perplexity relative to
    the control; a line per family and selector (colour: selector, line style: family), random as the mean of its
    draws with their range as a band (a lone draw as points); the original (dotted) and the control (dashed) of the
    hybrid rows' runs as horizontal lines. Rows whose budget is a count of an unknown total are left out."""
    require(table, ["run", "architecture", *HYBRID_COLUMNS, "stage2_tokens", "retrieval_fraction", "retrieval_stages",
                    "ppl_vs_control"], "ladder.parquet")
    tokens, rows = _chosen(table, tokens)
    runs = table[table["run"].isin(set(rows["run"])) & table["family"].isna()]
    originals = runs[runs["architecture"] == ORIGINAL]
    controls = runs[(runs["architecture"] == CONTROL) & (runs["stage2_tokens"] == tokens)]
    labels = {task.column: task.label for task in recall_tasks.tasks()}
    columns = [c.removesuffix("_acc") for c in table.columns if c.endswith("_acc") and rows[c].notna().any()]
    panels = len(columns) + 1
    width = min(3, panels)
    fig, axes = task_panels(panels, 2.0, 1.0)
    shares = sorted(set(rows["kv_share"]))
    series = _series(rows)
    varied = len(rows[["retrieval_fraction", "retrieval_stages"]].drop_duplicates()) > 1
    for ax, task in zip(axes, columns):
        _share_axis(ax, shares)
        for label, line, group in series:
            _draw(ax, label, line, _points(group, task, f"{task}_acc"), True, group["selector"].iloc[0] == "random")
        _references(ax, originals, controls, f"{task}_acc", varied)
        ax.set_title(f"{labels.get(task, task)} ({_n_text(rows, task)})")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("accuracy")
    ax = axes[len(columns)]
    _share_axis(ax, shares)
    for label, line, group in series:
        _draw(ax, label, line, _points(group, None, "ppl_vs_control"), False, group["selector"].iloc[0] == "random")
    _references(ax, originals, controls, "ppl_vs_control", varied)
    ax.set_title("perplexity relative to the control")
    ax.set_ylabel("perplexity / control's")
    for index, ax in enumerate(axes[:panels]):
        if index + width >= panels:  # no panel below this one
            ax.set_xlabel("share of KV heads exact")
        sns.despine(ax=ax)
    legend = {}  # every panel's entries: a series may lack the first panel's task
    for ax in axes[:panels]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    handles, names = list(legend.values()), list(legend)
    fig.legend(handles, names, loc="outside lower center", ncols=2 if max(map(len, names)) > 30 else 4, fontsize="small")
    families = list(dict.fromkeys(rows["family"]))
    rest = f"the rest {families[0]}" if len(families) == 1 else "line style: the rest's family"
    counts = {_n_text(rows, task) for task in columns}
    n = f"{counts.pop()} per point" if len(counts) == 1 else "n per point: see each panel"
    fig.suptitle(f"Recall against the exact KV-head share, {rest}, after {token_label(tokens)} stage-2 tokens\n"
                 f"({n}; bars: 95 % intervals; random: mean of its draws, band: their range)")
    return fig
