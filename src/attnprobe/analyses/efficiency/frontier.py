"""The decode frontier: what each architecture recalls against what its decode step measurably costs, with the
bandwidth-bound softmax baseline (split-K) as the reference rather than transformers' SDPA path.

    fig = decode_frontier(rows, recall, context=32768, batch=8)   # rows: decode_bench.json's "rows"

Left: passkey accuracy (95 % Wilson interval) at the longest length the original solves, against the cache
bytes measured at `context` (log). Right: the same accuracy against decode speed relative to the split-K
baseline at (`context`, `batch`), each point labelled with its step's share of the HBM peak. One point per
architecture that both tables hold; the baseline's recall is the original's (the same model, same weights).
"""
from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from attnprobe.analyses.experiments.ablation import wilson_interval
from attnprobe.analyses.presentation import style
from attnprobe.analyses.presentation.figures import _bytes_label, label_lifts, passkey_frontier_length, require, styled
from attnprobe.errors import AttnprobeError

BASELINE = "original-split-k"


def frontier_points(rows: pd.DataFrame, recall: pd.DataFrame, context: int, batch: int) -> pd.DataFrame:
    """One row per architecture measured at (context, batch) with recall: cache bytes, speed-up against the
    split-K baseline (of the same decode mode: graph where the architecture has it, else eager against the
    baseline's graph row), HBM share, and passkey correct/total at the frontier length. The original
    (SDPA) and the baseline both take the original's recall."""
    require(rows, ["architecture", "context", "batch", "decode_mode", "decode_tokens_per_s", "kv_cache_bytes_measured"], "decode_bench rows")
    require(recall, ["variant", "task", "length", "correct"], "recall.parquet")
    at = rows[(rows["context"] == context) & (rows["batch"] == batch)]
    baseline = at[at["architecture"] == BASELINE]
    if baseline.empty:
        raise AttnprobeError(f"no {BASELINE} row at {context} tokens, batch {batch}: run decode_bench with --modes graph at that size")
    length = passkey_frontier_length(recall)
    passkey = recall[(recall["task"] == "passkey") & (recall["length"] == length)].groupby("variant")["correct"].agg(["sum", "count"])
    reference = float(baseline["decode_tokens_per_s"].iloc[0])
    points = []
    for name, group in at.groupby("architecture", sort=False):
        best = group.sort_values("decode_tokens_per_s").iloc[-1]  # a graph row where it ran, else eager
        variant = "original" if name in ("original", BASELINE) else name
        if variant not in passkey.index:
            continue
        points.append({"architecture": name, "mode": best["decode_mode"], "cache_bytes": float(best["kv_cache_bytes_measured"]),
                       "speedup_vs_split_k": float(best["decode_tokens_per_s"]) / reference,
                       "hbm_share": float(best.get("hbm_share", math.nan)), "correct": int(passkey.at[variant, "sum"]),
                       "total": int(passkey.at[variant, "count"]), "length": length})
    return pd.DataFrame(points)


@styled
def decode_frontier(rows: pd.DataFrame, recall: pd.DataFrame, context: int, batch: int) -> Figure:
    points = frontier_points(rows, recall, context, batch)
    if points.empty:
        raise AttnprobeError("no architecture is in both the decode rows and recall.parquet: match their names")
    fig = style.new_figure("full", height=2.5)
    axes = fig.subplots(1, 2, sharey=True)
    accuracy = points["correct"] / points["total"]
    for ax, column in zip(axes, ("cache_bytes", "speedup_vs_split_k")):
        lifts = label_lifts(list(zip(points[column], accuracy)), log=True)
        for point, acc, lift in zip(points.itertuples(), accuracy, lifts):
            low, high = wilson_interval(point.correct, point.total)
            baseline = point.architecture == BASELINE
            marker, color = ("*", "black") if baseline else ("s", "grey") if point.architecture == "original" else ("o", "C0")
            ax.errorbar([getattr(point, column)], [acc], yerr=[[acc - low], [high - acc]], fmt=marker, color=color,
                        markersize=9 if baseline else 5, capsize=2)
            share = "" if column == "cache_bytes" or math.isnan(point.hbm_share) else f" ({point.hbm_share:.0%} HBM)"
            ax.annotate(point.architecture + share, (getattr(point, column), acc), textcoords="offset points",
                        xytext=(4, 3 + 8 * lift), fontsize=6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.05, 1.05)
    axes[0].xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axes[0].xaxis.set_major_formatter(FuncFormatter(lambda value, _: _bytes_label(value)))
    axes[0].set_xlabel(f"cache + states at {context} tokens, batch {batch} (less is cheaper)")
    axes[1].axvline(1.0, color="black", linewidth=0.6, linestyle=":")
    axes[1].set_xlabel("decode speed / split-K softmax baseline (more is faster)")
    axes[0].set_ylabel(f"passkey accuracy at {int(points['length'].iloc[0])} tokens")
    fig.suptitle("Recall against measured decode cost, the softmax baseline near its memory bound (bars: 95 % Wilson)")
    return fig
