"""Paper figures. Each is a pure function of a run's tables (pandas DataFrames) returning a Figure;
only the attention maps run a model. `report.make_figures` draws them all from a run directory.

    fig = census_scores(heads)                       # layer x head heatmap per score
    style.save(fig, out_dir, "census_scores", ("png", "svg"))
    fig = attention_map(model, backend, "The cat sat.", layer=3, head=1, log=True)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from attnprobe.errors import AttnprobeError
from attnprobe.probe.mechanisms import default_thresholds, mechanisms

from attnprobe.analyses import tasks as recall_tasks
from attnprobe.analyses.presentation import style
from attnprobe.analyses.presentation.style import styled

# heads.parquet column, panel title, from the mechanism registry (weakest claim first); all are attention fractions
SCORE_PANELS = tuple((m.panel_column or m.column, m.panel) for m in reversed(mechanisms()) if m.panel)


# ----------------------------------------------------------------------------- helpers

def require(table: pd.DataFrame | None, columns: Sequence[str], name: str) -> pd.DataFrame:
    """Raise AttnprobeError unless `table` has rows and `columns` (the report turns it into a skip)."""
    if table is None or len(table) == 0:
        raise AttnprobeError(f"{name} is empty: rerun the step that writes it")
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise AttnprobeError(f"{name} lacks columns {', '.join(missing)}: rerun the step that writes it")
    return table


def show_token(token: str, limit: int = 12) -> str:
    """A token as a readable label: visible spaces and newlines, byte-level BPE markers undone."""
    token = str(token).replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")
    token = token.replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    token = token.replace(" ", "␣")
    if not token:
        return "∅"
    return token if len(token) <= limit else token[: limit - 1] + "…"


def _layer_types(heads: pd.DataFrame) -> list[str] | None:
    """Per-layer "full"/"sliding" when the model mixes them (a strip is noise otherwise)."""
    if "layer_type" not in heads.columns:
        return None
    types = heads.groupby("layer")["layer_type"].first()
    known = set(types) <= set(style.LAYER_TYPE_COLORS)
    return list(types) if known and types.nunique() > 1 else None


def _layer_strip(ax, layer_types: list[str]) -> None:
    kinds = list(style.LAYER_TYPE_COLORS)
    codes = np.array([[kinds.index(kind)] for kind in layer_types])
    sns.heatmap(codes, ax=ax, cmap=ListedColormap(list(style.LAYER_TYPE_COLORS.values())), vmin=-0.5,
                vmax=len(kinds) - 0.5, cbar=False, xticklabels=["type"], yticklabels="auto",
                linewidths=0.3, linecolor="white")
    ax.set_ylabel("layer")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=90, length=0)
    ax.tick_params(axis="y", rotation=0, length=0)


def _layer_type_legend(fig: Figure) -> None:
    handles = [Patch(color=color, label=f"{kind} attention") for kind, color in style.LAYER_TYPE_COLORS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))


def _heatmap_row(fig: Figure, n_panels: int, n_heads: int, layer_types: list[str] | None):
    """Axes for a row of layer x head panels, with a one-cell-wide layer-type strip in front when useful."""
    ratios = ([max(0.08, 1.0 / n_heads)] if layer_types else []) + [1.0] * n_panels
    grid = fig.add_gridspec(1, len(ratios), width_ratios=ratios)
    axes = [fig.add_subplot(grid[0, index]) for index in range(len(ratios))]
    if layer_types:
        _layer_strip(axes[0], layer_types)
        return axes[1:], axes[0]
    return axes, None


def _grid(table: pd.DataFrame, value: str) -> pd.DataFrame:
    return table.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index()


def _height_for_layers(n_layers: int) -> float:
    return float(np.clip(0.11 * n_layers + 1.3, 2.2, 6.0))


# ----------------------------------------------------------------------------- census

@styled
def census_scores(heads: pd.DataFrame) -> Figure:
    """One layer x head heatmap per score in SCORE_PANELS, one shared 0-1 colour scale."""
    panels = [(column, title) for column, title in SCORE_PANELS if column in heads.columns]
    require(heads, ["layer", "head"], "heads.parquet")
    if not panels:
        raise AttnprobeError(f"heads.parquet has no score column ({', '.join(c for c, _ in SCORE_PANELS)}): rerun the census")
    layer_types = _layer_types(heads)
    n_layers = heads["layer"].nunique()
    fig = style.new_figure("full", height=_height_for_layers(n_layers))
    axes, strip = _heatmap_row(fig, len(panels), heads["head"].nunique(), layer_types)
    vmax = max(1.0, float(np.nanmax(heads[[column for column, _ in panels]].to_numpy())))
    for index, (ax, (column, title)) in enumerate(zip(axes, panels)):
        sns.heatmap(_grid(heads, column), ax=ax, cmap=style.SEQUENTIAL, vmin=0, vmax=vmax, cbar=False,
                    yticklabels="auto" if strip is None and index == 0 else False)
        ax.set_title(title)
        ax.set_xlabel("head")
        ax.set_ylabel("layer" if strip is None and index == 0 else "")
        ax.tick_params(axis="y", rotation=0, length=0)
        ax.tick_params(axis="x", length=0)
    fig.colorbar(axes[0].collections[0], ax=axes, shrink=0.7, aspect=30, label="score (attention fraction)")
    fig.suptitle("Head census: scores by layer and head")
    if layer_types:
        _layer_type_legend(fig)
    return fig


@styled
def role_map(heads: pd.DataFrame) -> Figure:
    """Role labels per head: colour = the head's first role in style.ROLES order, letters = all roles."""
    require(heads, ["layer", "head", "roles"], "heads.parquet")
    table = heads.copy()
    role_lists = table["roles"].fillna("").map(lambda text: [role for role in text.split(",") if role])
    order = list(style.ROLES) + ["none"]
    table["primary"] = role_lists.map(lambda roles: min((order.index(role) for role in roles if role in order),
                                                        default=order.index("none")))
    table["letters"] = role_lists.map(lambda roles: "".join(style.ROLE_ABBREVIATIONS.get(role, "?") for role in roles))
    codes = _grid(table, "primary")
    letters = table.pivot(index="layer", columns="head", values="letters").sort_index().fillna("")
    layer_types = _layer_types(heads)
    n_heads = heads["head"].nunique()
    fig = style.new_figure("column" if n_heads <= 12 else "full", height=_height_for_layers(codes.shape[0]) + 0.4)
    (ax,), strip = _heatmap_row(fig, 1, n_heads, layer_types)
    colors = [style.ROLE_COLORS[role] for role in order]
    sns.heatmap(codes, ax=ax, cmap=ListedColormap(colors), vmin=-0.5, vmax=len(order) - 0.5, cbar=False,
                annot=letters.to_numpy(), fmt="", annot_kws={"fontsize": 5.5}, linewidths=0.3, linecolor="white",
                yticklabels="auto" if strip is None else False)
    ax.set_xlabel("head")
    ax.set_ylabel("layer" if strip is None else "")
    ax.tick_params(axis="y", rotation=0)
    present = sorted({role for roles in role_lists for role in roles if role in order}, key=order.index)
    handles = [Patch(color=style.ROLE_COLORS[role], label=f"{style.ROLE_ABBREVIATIONS[role]}  {role.replace('_', ' ')}")
               for role in present] + [Patch(color=style.ROLE_COLORS["none"], label="   none")]
    if layer_types:
        handles += [Patch(color=color, label=f"{kind} layer") for kind, color in style.LAYER_TYPE_COLORS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, handlelength=1.0, columnspacing=1.0)
    fig.suptitle("Head roles")
    return fig


# ----------------------------------------------------------------------------- sinks

@styled
def sink_alpha(heads: pd.DataFrame, sink_rate: dict | None = None) -> Figure:
    """alpha_1 of every head against its layer; the sink threshold and sink rate when known."""
    require(heads, ["layer", "head", "alpha_1"], "heads.parquet")
    eps = float((sink_rate or {}).get("eps", default_thresholds()["sink"]))
    fig = style.new_figure("column", aspect=0.7)
    ax = fig.add_subplot()
    layer_types = _layer_types(heads)
    if layer_types:  # shade full-attention layers of a hybrid model
        for layer, kind in enumerate(layer_types):
            if kind == "full":
                ax.axvspan(layer - 0.5, layer + 0.5, color="#ececec", lw=0, zorder=0)
    sns.stripplot(data=heads, x="layer", y="alpha_1", native_scale=True, ax=ax, color=style.SELECTION_COLORS["random"],
                  size=2.5, jitter=0.2, alpha=0.8, zorder=2)
    means = heads.groupby("layer")["alpha_1"].mean()
    ax.plot(means.index, means.to_numpy(), color="black", lw=1.0, label="mean over heads", zorder=3)
    ax.axhline(eps, color=style.SELECTION_COLORS["top"], ls="--", lw=0.8, label=f"ε = {eps:g}")
    ax.set_ylim(-0.02, 1.14 if sink_rate else 1.02)  # headroom for the sink-rate line
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_xlabel("layer")
    ax.set_ylabel("α₁ (attention to first token)")
    ax.set_title("First-token sink mass per head")
    handles, _ = ax.get_legend_handles_labels()
    if layer_types:
        handles.append(Patch(color="#ececec", label="full-attention layer"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), columnspacing=1.0, handlelength=1.5)
    if sink_rate and sink_rate.get("with_bos") is not None:
        text = f"Sink₁ rate (T={sink_rate.get('T', '?')}): {sink_rate['with_bos']:.1f}% with BOS"
        if sink_rate.get("without_bos") is not None:
            text += f", {sink_rate['without_bos']:.1f}% without"
        ax.text(0.01, 0.99, text, transform=ax.transAxes, va="top", fontsize=6.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


@styled
def hidden_sink_tokens(sinks: pd.DataFrame, top: int = 15) -> Figure:
    """Which tokens are hidden sinks and how often (events = layer, head, position triples)."""
    require(sinks, ["layer", "head", "position", "token", "alpha"], "sinks.parquet")
    table = sinks.assign(label=sinks["token"].map(show_token))
    counts = (table.groupby("label")
              .agg(events=("alpha", "size"), heads=("head", lambda s: len(set(zip(table.loc[s.index, "layer"], s)))),
                   mean_alpha=("alpha", "mean"))
              .sort_values("events", ascending=False).head(top).reset_index())
    fig = style.new_figure("column", height=0.9 + 0.16 * len(counts))
    ax = fig.add_subplot()
    counts["label"] = counts["label"].map(lambda token: f"‘{token}’")  # quotes make "." and "," visible
    sns.barplot(data=counts, y="label", x="events", ax=ax, color=style.ROLE_COLORS["hidden_sink"], orient="h")
    for index, row in counts.iterrows():
        ax.text(row["events"], index, f"  {row['heads']} heads, mean α {row['mean_alpha']:.2f}", va="center", fontsize=6)
    ax.set_xlim(0, counts["events"].max() * 1.6)
    ax.set_xlabel("hidden-sink events (layer, head, position)")
    ax.set_ylabel("token")
    ax.set_title("Hidden-sink tokens")
    sns.despine(ax=ax)
    return fig


@styled
def secondary_sink_levels(secondary: pd.DataFrame) -> Figure:
    """Sink levels: creation layer x lifetime, marker size = tokens, colour = class."""
    require(secondary, ["creation_layer", "lifetime", "sink_class", "level"], "secondary_sinks.parquet")
    groups = (secondary.groupby(["creation_layer", "lifetime", "sink_class", "level"]).size()
              .rename("tokens").reset_index())
    fig = style.new_figure("column", aspect=0.75)
    ax = fig.add_subplot()
    sns.scatterplot(data=groups, x="creation_layer", y="lifetime", hue="sink_class", size="tokens", sizes=(20, 160),
                    palette=style.SINK_CLASS_COLORS, hue_order=[k for k in style.SINK_CLASS_COLORS if k in set(groups["sink_class"])],
                    ax=ax, edgecolor="white", linewidth=0.5, alpha=0.9)
    for level, members in groups.groupby("level"):
        centre = np.average(members[["creation_layer", "lifetime"]].to_numpy(), axis=0, weights=members["tokens"])
        ax.annotate(f"level {level}", centre, xytext=(6, 6), textcoords="offset points", fontsize=6)
    ax.set_xlabel("creation layer")
    ax.set_ylabel("lifetime (layers)")
    ax.set_title("Sink levels")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.margins(0.15)
    handles, labels = ax.get_legend_handles_labels()
    labels = ["class" if label == "sink_class" else label for label in labels]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6)
    sns.despine(ax=ax)
    return fig


# ----------------------------------------------------------------------------- massive activations

@styled
def massive_by_layer(massive_layers: pd.DataFrame) -> Figure:
    """Top-3 residual magnitudes and the median per layer, log scale."""
    require(massive_layers, ["layer", "top1", "top2", "top3", "median"], "massive_layers.parquet")
    table = massive_layers.sort_values("layer")
    fig = style.new_figure("column", aspect=0.7)
    ax = fig.add_subplot()
    shades = sns.color_palette("rocket", 4)
    for column, color in zip(("top1", "top2", "top3"), shades):
        ax.plot(table["layer"], table[column].abs(), marker="o", color=color, label=column.replace("top", "top-"))
    ax.plot(table["layer"], table["median"].abs(), color="#777777", ls="--", marker=".", label="median")
    ax.axhline(100, color="#bbbbbb", lw=0.7, ls=":", zorder=0)
    ax.text(table["layer"].min(), 100, " 100 (threshold)", va="bottom", fontsize=6, color="#777777")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("|activation| (residual stream)")
    ax.set_title("Massive activations by layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(ncols=2)
    sns.despine(ax=ax)
    return fig


@styled
def massive_locations(massive: pd.DataFrame, top: int = 12) -> Figure:
    """Where massive activations sit: one row per (position, dim, token), a dot per layer it is massive in."""
    require(massive, ["layer", "position", "token", "dim", "value", "ratio"], "massive.parquet")
    table = massive.assign(magnitude=massive["value"].abs())
    keys = ["position", "dim", "token"]
    peaks = table.groupby(keys).agg(peak=("magnitude", "max"), ratio=("ratio", "max"), sign=("value", "last"))
    peaks = peaks.sort_values("peak", ascending=False).head(top)
    rows = {key: index for index, key in enumerate(peaks.index)}
    shown = table[table.set_index(keys).index.isin(peaks.index)].copy()
    shown["row"] = [rows[key] for key in shown.set_index(keys).index]
    fig = style.new_figure("full", height=1.0 + 0.2 * len(peaks))
    ax = fig.add_subplot()
    norm = LogNorm(vmin=shown["magnitude"].min(), vmax=max(shown["magnitude"].max(), shown["magnitude"].min() * 1.01))
    points = ax.scatter(shown["layer"], shown["row"], c=shown["magnitude"], cmap=style.SEQUENTIAL, norm=norm, s=22,
                        marker="s", edgecolor="none")
    labels = [f"pos {pos} · dim {dim} · ‘{show_token(token)}’" for pos, dim, token in peaks.index]
    ax.set_yticks(range(len(peaks)), labels)
    ax.set_ylim(len(peaks) - 0.5, -0.5)
    layers = table["layer"]
    ax.set_xlim(layers.min() - 0.7, layers.max() + 0.7)
    peak_axis = ax.twinx()  # the right-hand "table column": peak value, sign and ratio to the median
    peak_axis.set_ylim(ax.get_ylim())
    peak_axis.set_yticks(range(len(peaks)), [
        f"{'+' if row['sign'] >= 0 else '−'}{_compact(row['peak'])}  ({_compact(row['ratio'])}× median)"
        for _, row in peaks.iterrows()])
    peak_axis.tick_params(length=0)
    peak_axis.set_ylabel("peak value (ratio)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("position · dim · token")
    ax.set_title("Where massive activations sit")
    fig.colorbar(points, ax=[ax, peak_axis], label="|activation|", shrink=0.9, aspect=15)
    for axis in (ax, peak_axis):
        axis.spines["top"].set_visible(False)
    return fig


def _compact(value: float) -> str:
    return f"{value:,.0f}" if 100 <= abs(value) < 1e7 else f"{value:.3g}"


# ----------------------------------------------------------------------------- recall

def _bytes_label(value: float) -> str:
    """'9.4 MB'-style tick text: the style turns mathtext off, so log ticks need plain labels."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


@styled
def recall_grids(niah: pd.DataFrame) -> Figure:
    """Accuracy over needle depth x context length: rows = task, columns = variant."""
    require(niah, ["variant", "task", "length", "depth", "correct"], "niah.parquet")
    accuracy = niah.groupby(["task", "variant", "depth", "length"])["correct"].mean().reset_index()
    tasks, variants = list(niah["task"].unique()), list(niah["variant"].unique())  # the run's own order
    n_depths = accuracy["depth"].nunique()
    scale = 100 if accuracy["depth"].max() <= 1 else 1  # depth as a fraction or already in percent
    fig = style.new_figure("full", height=0.6 + len(tasks) * (0.35 + 0.17 * n_depths))
    axes = fig.subplots(len(tasks), len(variants), squeeze=False, sharex=True, sharey="row")  # tasks differ in depths
    for row, task in enumerate(tasks):
        for column, variant in enumerate(variants):
            ax = axes[row, column]
            cells = accuracy[(accuracy["task"] == task) & (accuracy["variant"] == variant)]
            grid = cells.pivot(index="depth", columns="length", values="correct").sort_index()
            grid.index = [f"{depth * scale:g}%" for depth in grid.index]
            sns.heatmap(grid, ax=ax, cmap=style.SEQUENTIAL, vmin=0, vmax=1, cbar=False, annot=grid * 100, fmt=".0f",
                        annot_kws={"fontsize": 5.5}, linewidths=0.3, linecolor="white")
            ax.set_title(f"{task} · {variant}")
            ax.set_xlabel("context length (tokens)" if row == len(tasks) - 1 else "")
            ax.set_ylabel("needle depth" if column == 0 else "")
            ax.tick_params(axis="y", rotation=0, length=0)
            ax.tick_params(axis="x", rotation=0, length=0)
    fig.colorbar(axes[0, 0].collections[0], ax=axes, shrink=0.8, aspect=30, label="accuracy (%)",
                 format=lambda value, _: f"{value:.0%}")
    fig.suptitle("Needle recall (cell text: accuracy %)")
    return fig


_T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
          2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci95(values: pd.Series) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (0 for a single value)."""
    n = len(values)
    mean = float(values.mean())
    if n < 2:
        return mean, 0.0
    t = _T_975[n - 2] if n - 2 < len(_T_975) else 1.96
    return mean, t * float(values.std(ddof=1)) / math.sqrt(n)


@styled
def ablation_curves(ablation: pd.DataFrame) -> Figure:
    """Accuracy against heads ablated, top-K by score vs random K; bands: 95 % Wilson intervals of the
    samples, and for random K the mean over draws with a t interval over the draws' accuracies (the
    spread between draws counts)."""
    from attnprobe.analyses.stats import mean_interval, wilson_interval

    require(ablation, ["task", "selection", "k", "seed", "accuracy", "n"], "ablation.parquet")
    rows = []
    for (task, selection, k), group in ablation[ablation["selection"].isin(["none", "top", "random"])].groupby(["task", "selection", "k"]):
        if selection == "random" and len(group) > 1:
            mean, low, high = mean_interval(group["accuracy"].tolist())
        else:
            correct, n = int((group["accuracy"] * group["n"]).round().sum()), int(group["n"].sum())
            mean, (low, high) = correct / n, wilson_interval(correct, n)
        rows.append({"task": task, "selection": selection, "k": k, "mean": mean, "low": low, "high": high})
    summary = pd.DataFrame(rows)
    tasks = list(ablation["task"].unique())
    fig = style.new_figure("column" if len(tasks) <= 2 else "full", height=2.0)
    axes = fig.subplots(1, len(tasks), squeeze=False, sharey=True)[0]
    for ax, task in zip(axes, tasks):
        for selection, curve in summary[summary["task"] == task].groupby("selection"):
            curve = curve.sort_values("k")
            color = style.SELECTION_COLORS.get(selection, "black")
            label = {"top": "top-K heads", "random": "random K heads"}.get(selection, selection)
            ax.plot(curve["k"], curve["mean"], marker="o", color=color, label=label)
            ax.fill_between(curve["k"], curve["low"], curve["high"], color=color, alpha=0.2, lw=0)
        ax.set_title(task)
        ax.set_xlabel("heads ablated (K)")
        ax.set_ylim(-0.03, 1.03)
        sns.despine(ax=ax)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower left")
    fig.suptitle("Head ablation\n(95 % bands: Wilson; random K: t over draws)")
    return fig


@styled
def budget_curve(budget: pd.DataFrame, task: str = "passkey") -> Figure:
    """Recall against the share of heads kept exact, one line per selector and a panel per replacement
    kind: bars are 95 % Wilson intervals; random is the mean over its draws with a t interval over them,
    its band the range of the draws;
    the dashed line is the original model, the cross every head replaced."""
    require(budget, ["kind", "selector", "seed", "budget", "task", "correct", "n", "ci_low", "ci_high"], "budget.parquet")
    from attnprobe.analyses.stats import mean_interval, wilson_interval

    table = budget[budget["task"] == task]
    if table.empty:
        raise AttnprobeError(f"budget.parquet has no {task} rows: the sweep ran without that task")
    kinds = [k for k in table["kind"].unique() if k != "none" and (table[table["kind"] == k]["selector"] != "sparse").all()]
    fig = style.new_figure("column" if len(kinds) <= 1 else "full", height=2.4)
    axes = fig.subplots(1, max(1, len(kinds)), squeeze=False, sharey=True)[0]
    original = table[table["selector"] == "all-exact"]
    ranked = table[~table["selector"].isin(["all-exact", "none-exact", "sparse"])]
    colors = dict(zip(sorted(ranked["selector"].unique()), sns.color_palette("colorblind", 10)))
    colors["random"] = style.SELECTION_COLORS["random"]
    for ax, kind in zip(axes, kinds):
        rows = ranked[ranked["kind"] == kind]
        for selector, curve in rows.groupby("selector"):
            pooled = curve.groupby("budget", as_index=False)[["correct", "n"]].sum()
            pooled["accuracy"] = pooled["correct"] / pooled["n"]
            bounds = [wilson_interval(int(c), int(n)) for c, n in zip(pooled["correct"], pooled["n"])]
            draws = curve["seed"].nunique()
            if selector == "random" and draws > 1:  # the spread between draws counts: t over the draws' accuracies
                over_draws = [mean_interval(g["accuracy"].tolist()) for _, g in curve.groupby("budget")]
                pooled["accuracy"], bounds = [m for m, _, _ in over_draws], [(lo, hi) for _, lo, hi in over_draws]
            low = pooled["accuracy"] - [b[0] for b in bounds]
            high = [b[1] for b in bounds] - pooled["accuracy"]
            label = f"random ({draws} draws)" if selector == "random" else selector
            ax.errorbar(pooled["budget"], pooled["accuracy"], yerr=[low, high], marker="o", ms=3, capsize=2,
                        color=colors[selector], label=label)
            if selector == "random" and draws > 1:
                spread = curve.groupby("budget")["accuracy"].agg(["min", "max"]).reset_index()
                ax.fill_between(spread["budget"], spread["min"], spread["max"], color=colors[selector], alpha=0.2, lw=0)
        if not original.empty:
            ax.axhline(float(original["accuracy"].iloc[0]), color="black", ls="--", lw=1, label="original (all exact)")
        floor = table[(table["kind"] == kind) & (table["selector"] == "none-exact")]
        if not floor.empty:
            ax.plot([0], [float(floor["accuracy"].iloc[0])], marker="x", color="black", ls="none", label="none exact")
        ax.set_title(kind, fontsize="small")
        ax.set_xlabel("share of KV heads exact" if (rows["exact_heads"] > rows["units"]).any() else "share of heads exact")
        ax.set_ylim(-0.03, 1.03)
        sns.despine(ax=ax)
    axes[0].set_ylabel(f"{task} accuracy")
    axes[0].legend(loc="upper left", fontsize="x-small")  # low budgets sit at 0: the upper left is free
    fig.suptitle(f"{task}: recall against exact-head budget\n(bars: 95 % intervals)")  # fits one column
    return fig


def matrix_columns() -> dict:
    """column -> (label, higher is better): presence columns from the mechanism registry, accuracies
    from the task registry."""
    return {**{f"{m.matrix}_present": (m.matrix_label, True) for m in reversed(mechanisms()) if m.matrix},
            **{f"{t.column}_acc": (t.label, True) for t in recall_tasks.tasks()},
            "perplexity": ("perplexity ↓", False), "state_bytes_per_token": ("state B/token ↓", False)}


_MATRIX_COLUMNS = matrix_columns()


def _format_cell(column: str, value) -> str:
    if pd.isna(value):
        return "–"
    if column.endswith("_present"):
        return "✓" if bool(value) else "✗"
    if column.endswith("_acc"):
        return f"{value:.0%}"
    if column == "state_bytes_per_token":
        for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if abs(value) >= size:
                return f"{value / size:.1f} {unit}"
        return f"{value:.0f} B"
    return f"{value:.3g}"


@styled
def mechanism_matrix(matrix: pd.DataFrame) -> Figure:
    """Architectures x mechanisms/metrics: colour = per-column min-max score (bright = better), text = value."""
    require(matrix, ["architecture"], "matrix.parquet")
    known = matrix_columns()
    columns = [column for column in known if column in matrix.columns]
    if not columns:
        raise AttnprobeError("matrix.parquet has none of the mechanism or metric columns: rerun the swap step")
    table = matrix.set_index("architecture")[columns]
    colour = pd.DataFrame(index=table.index)
    for column in columns:
        values = table[column].astype(float)
        if column.endswith("_present"):  # present = 1, absent = 0, whatever the other rows hold
            colour[column] = values
            continue
        if column == "perplexity":  # spans orders of magnitude once heads are linearised
            values = np.log(values.clip(lower=1e-9))
        span = values.max() - values.min()
        scaled = (values - values.min()) / span if span > 0 else values * 0 + 0.5
        colour[column] = scaled if known[column][1] else 1 - scaled
    text = np.array([[_format_cell(column, table.at[row, column]) for column in columns] for row in table.index], dtype=object)
    for j, column in enumerate(columns):  # accuracies carry their 95 % Wilson interval where the run has it
        low, high = column.replace("_acc", "_ci_low"), column.replace("_acc", "_ci_high")
        if column.endswith("_acc") and low in matrix.columns:
            bounds = matrix.set_index("architecture")[[low, high]]
            for i, row in enumerate(table.index):
                if not pd.isna(bounds.at[row, low]):
                    text[i, j] = f"{text[i, j]}\n{bounds.at[row, low]:.0%}-{bounds.at[row, high]:.0%}"
    fig = style.new_figure("full", height=1.3 + 0.28 * len(table))
    ax = fig.add_subplot()
    sns.heatmap(colour, ax=ax, cmap=style.SEQUENTIAL, vmin=0, vmax=1, annot=text, fmt="", annot_kws={"fontsize": 6.5},
                linewidths=0.6, linecolor="white",
                cbar_kws={"label": "column-scaled (bright = better)", "shrink": 0.9, "aspect": 12})
    ax.set_xticklabels([known[column][0] for column in columns], rotation=30, ha="right")
    ax.tick_params(axis="y", rotation=0)
    ax.set_xlabel("mechanism present / metric")
    ax.set_ylabel("architecture")
    ax.set_title("Mechanism loss by architecture")
    return fig


def longest_measured(matrix: pd.DataFrame, column: str) -> int | None:
    """The longest context T whose `{column}_{T}` column holds a measurement."""
    contexts = [int(name.rpartition("_")[2]) for name in matrix.columns
                if name.startswith(f"{column}_") and name.rpartition("_")[2].isdigit() and matrix[name].notna().any()]
    return max(contexts) if contexts else None


def passkey_frontier_length(recall: pd.DataFrame) -> int:
    """The longest passkey length the original solves (accuracy >= 0.5), else the shortest length tried."""
    passkey = recall[recall["task"] == "passkey"]
    if passkey.empty:
        raise AttnprobeError("recall.parquet has no passkey rows: rerun swap --matrix with the passkey task")
    by_length = passkey[passkey["variant"] == "original"].groupby("length")["correct"].mean()
    solved = by_length[by_length >= 0.5]
    return int(solved.index.max()) if not solved.empty else int(passkey["length"].min())


def label_lifts(points: Sequence[tuple[float, float]], log: bool = False, near: float = 0.3) -> list[int]:
    """How many label heights to raise each point's label so labels of points that lie close together (x within
    `near` of the panel's x span, about one label's width; log x on a log axis; accuracy within 0.05) do not
    print over each other."""
    xs = [math.log10(max(x, 1e-30)) if log else x for x, _ in points]
    span = (max(xs) - min(xs)) or 1.0
    lifts: list[int] = []
    for i, (x, (_, y)) in enumerate(zip(xs, points)):
        taken = {lifts[j] for j in range(i) if abs(xs[j] - x) < near * span and abs(points[j][1] - y) < 0.05}
        lifts.append(next(level for level in range(len(points) + 1) if level not in taken))
    return lifts


@styled
def frontier(matrix: pd.DataFrame, recall: pd.DataFrame) -> Figure:
    """Recall against decode cost: passkey accuracy (95 % Wilson interval) at the longest length the original
    solves, against the measured cache bytes and decode tokens/s at the longest context measured; one
    point per architecture, the original a star, controls (names with 'random' or 'control') hollow."""
    from attnprobe.analyses.stats import wilson_interval

    require(matrix, ["architecture"], "matrix.parquet")
    require(recall, ["variant", "task", "length", "correct"], "recall.parquet")
    length = passkey_frontier_length(recall)
    at = recall[(recall["task"] == "passkey") & (recall["length"] == length)].groupby("variant")["correct"].agg(["sum", "count"])
    panels = [(column, longest_measured(matrix, column)) for column in ("kv_cache_bytes_measured", "decode_tokens_per_s")]
    if any(context is None for _, context in panels):
        raise AttnprobeError("matrix.parquet has no measured efficiency columns: rerun swap --matrix")
    fig = style.new_figure("full", height=2.4)
    axes = fig.subplots(1, 2, sharey=True)
    labels = {"kv_cache_bytes_measured": "cache + states, bytes (less is cheaper)", "decode_tokens_per_s": "decode tokens/s (more is faster)"}
    for ax, (column, context) in zip(axes, panels):
        points = [(row.architecture, float(getattr(row, f"{column}_{context}"))) for row in matrix.itertuples()
                  if row.architecture in at.index and not pd.isna(getattr(row, f"{column}_{context}"))]
        accuracies = {name: at.at[name, "sum"] / at.at[name, "count"] for name, _ in points}
        lifts = label_lifts([(x, accuracies[name]) for name, x in points], log=column == "kv_cache_bytes_measured")
        for (name, x), lift in zip(points, lifts):
            correct, total = int(at.at[name, "sum"]), int(at.at[name, "count"])
            low, high = wilson_interval(correct, total)
            accuracy = correct / total
            control = "random" in name or "control" in name
            marker, color = ("*", "black") if name == "original" else ("o", style.SELECTION_COLORS.get("random", "grey") if control else "C0")
            ax.errorbar([x], [accuracy], yerr=[[accuracy - low], [high - accuracy]], fmt=marker, color=color,
                        markerfacecolor="none" if control else color, markersize=9 if name == "original" else 5, capsize=2)
            ax.annotate(name, (x, accuracy), textcoords="offset points", xytext=(4, 3 + 8 * lift), fontsize=6)
        if column == "kv_cache_bytes_measured":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # a span under a decade still gets labels
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: _bytes_label(value)))  # no mathtext (style)
        ax.set_xlabel(f"{labels[column]} at {context} tokens")
        ax.set_ylim(-0.05, 1.05)
        sns.despine(ax=ax)
    axes[0].set_ylabel(f"passkey accuracy at {length} tokens")
    fig.suptitle("What each architecture saves against what it recalls (bars: 95 % Wilson interval)")
    return fig


# ----------------------------------------------------------------------------- attention maps
