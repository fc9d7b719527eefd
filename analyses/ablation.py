"""Ablations of chosen heads, and the retrieval-head masking sweep (top-K against random-K).

Modes: zero (output 0), mean (output = its mean over reference text), uniform (query zeroed, so
attention is uniform over the prefix: the retrieval-head paper's masking), and calibrate (ACT: scale
attention to hidden sinks by beta and give the mass back to the other keys in proportion).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.edits import AttentionCall, Edit, mean_heads, replace_heads, uniform_heads, zero_heads
from attnprobe.hooks.errors import AttnprobeError
from attnprobe.hooks.model import Model
from attnprobe.hooks.reducers import Apply
from attnprobe.hooks.sites import Site
from attnprobe.probe import texts

from .selection import Head, by_layer, parse_heads, top_heads

MODES = ("zero", "mean", "uniform", "calibrate")


def head_means(backend: Backend, model: Model, layers: Sequence[int], n_tokens: int = 1024) -> dict[int, torch.Tensor]:
    """Mean per-head output z (H, d) of each layer over held-out reference text."""
    ids = torch.tensor([texts.held_out_ids(model.tokenizer, n_tokens)])
    readers = {layer: Apply(lambda z: z.float().mean(dim=(0, 1)).cpu()) for layer in layers}
    backend.run(ids, reads={(layer, Site.Z): r for layer, r in readers.items()})
    return {layer: r.result()[0] for layer, r in readers.items()}


def calibrate_sinks(layer: int, heads: Sequence[int], beta: float = 0.4, threshold: float = 0.1,
                    min_queries: int = 16) -> Edit:
    """ACT's calibration: on each prefill, keys k > 0 with alpha_k > threshold (seen by >= min_queries
    queries) get their attention scaled by beta, and each row is renormalised. Decode steps reuse the
    prefill's sink positions."""
    heads = list(heads)

    def weights(call: AttentionCall, state: dict) -> torch.Tensor:
        """Calibrated attention of every query of this call, (B, len(heads), T, S), cached per call."""
        if state.get("call") is call:
            return state["weights"]
        keys, _ = call.repeated_kv()
        rows = call.query_positions.to(call.q.device)
        key_positions = torch.arange(keys.shape[2], device=call.q.device)
        scores = (call.q[:, heads].float() @ keys[:, heads].float().transpose(-1, -2)) * call.scaling
        visible = key_positions[None, :] <= rows[:, None]
        if call.window is not None:
            visible &= (rows[:, None] - key_positions[None, :]) < call.window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        if not call.is_decode:  # a prefill: find this input's sinks
            seen_by = torch.arange(keys.shape[2], 0, -1, device=probs.device, dtype=torch.float32)
            if call.window is not None:
                seen_by = seen_by.clamp(max=call.window)
            alpha = probs.sum(dim=2) / seen_by
            sinks = (alpha > threshold) & (seen_by >= min_queries)
            sinks[..., 0] = False  # the first token is the primary sink, which ACT keeps
            state["sinks"] = sinks
        sinks = state["sinks"][..., : keys.shape[2]]
        if sinks.shape[-1] < keys.shape[2]:  # decode: keys after the prefill are never sinks
            sinks = torch.nn.functional.pad(sinks, (0, keys.shape[2] - sinks.shape[-1]))
        scaled = probs * torch.where(sinks, beta, 1.0)[:, :, None, :]
        state["call"], state["weights"] = call, scaled / scaled.sum(dim=-1, keepdim=True)
        return state["weights"]

    def head_fn(call: AttentionCall, chosen: list[int], state: dict) -> torch.Tensor:
        _, values = call.repeated_kv()
        return (weights(call, state) @ values[:, heads].float()).transpose(1, 2)

    def pattern_fn(call: AttentionCall, rows: torch.Tensor) -> torch.Tensor:
        offset = call.k.shape[2] - call.q.shape[2]
        return weights(call, edit.state)[:, :, (rows - offset).to(call.q.device)]

    edit = replace_heads(layer, heads, head_fn)
    edit.label = f"calibrate L{layer} H{heads} beta={beta}"
    edit.pattern_fn = pattern_fn
    return edit


def ablation_edits(model: Model, backend: Backend, heads: Sequence[Head], mode: str, beta: float = 0.4) -> list[Edit]:
    if mode not in MODES:
        raise AttnprobeError(f"unknown ablation mode '{mode}': choose one of {', '.join(MODES)}")
    grouped = by_layer(list(heads))
    if mode == "zero":
        return [zero_heads(layer, hs) for layer, hs in grouped.items()]
    if mode == "uniform":
        return [uniform_heads(layer, hs) for layer, hs in grouped.items()]
    if mode == "calibrate":
        return [calibrate_sinks(layer, hs, beta) for layer, hs in grouped.items()]
    means = head_means(backend, model, list(grouped))
    return [mean_heads(layer, hs, means[layer]) for layer, hs in grouped.items()]


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    if total == 0:
        return math.nan, math.nan
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


Task = Callable[[Model, str], pd.DataFrame]  # (model, variant label) -> rows with a boolean `correct`


def evaluate(model: Model, backend: Backend, edits: Sequence[Edit], task: Task, label: str) -> pd.DataFrame:
    with backend.patched(list(edits)):
        return task(model, label)


def masking_sweep(model: Model, backend: Backend, run_dir: Path, ks: Sequence[int], seeds: int, task: Task,
                  mode: str = "uniform", score: str = "retrieval_score",
                  progress: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mask the top-K heads by `score` and, for each seed, K random heads drawn outside the top max(K).

    Returns (summary: task, selection, k, seed, accuracy, n, ci_low, ci_high; every sample's row)."""
    progress = progress or (lambda message: None)
    info = model.info
    banned = top_heads(run_dir, max(ks), score)
    samples = [evaluate(model, backend, [], task, "original").assign(selection="none", k=0, seed=-1)]
    progress("original")
    for k in ks:
        top = top_heads(run_dir, k, score)
        samples.append(evaluate(model, backend, ablation_edits(model, backend, top, mode), task, f"top-{k}")
                       .assign(selection="top", k=k, seed=-1))
        progress(f"top-{k}")
        for seed in range(seeds):
            exclude = ",".join(f"{layer}.{head}" for layer, head in banned)
            chosen = parse_heads(f"random:{k}", info, run_dir, seed, exclude=exclude)
            samples.append(evaluate(model, backend, ablation_edits(model, backend, chosen, mode), task, f"random-{k}-s{seed}")
                           .assign(selection="random", k=k, seed=seed))
            progress(f"random-{k} seed {seed}")
    rows = pd.concat(samples, ignore_index=True)
    return wilson_summary(rows), rows


def wilson_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (task, selection, k, seed) of sample rows with a boolean `correct`, with its 95 % Wilson interval."""
    summary = []
    for (task_name, selection, k, seed), group in rows.groupby(["task", "selection", "k", "seed"]):
        correct, total = int(group["correct"].sum()), len(group)
        low, high = wilson_interval(correct, total)
        summary.append({"task": task_name, "selection": selection, "k": int(k), "seed": int(seed),
                        "accuracy": correct / total, "n": total, "ci_low": low, "ci_high": high})
    return pd.DataFrame(summary)
