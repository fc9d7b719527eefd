"""Ablations of chosen heads, and the retrieval-head masking sweep (top-K against random-K).

Modes: zero (output 0), mean (output = its mean over reference text), uniform (query zeroed, so
attention is uniform over the prefix: the retrieval-head paper's masking), and calibrate (ACT: scale
attention to hidden sinks by beta and give the mass back to the other keys in proportion).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.edits import AttentionCall, Edit, mean_heads, replace_heads, uniform_heads, zero_heads
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model
from attnprobe.hooks.reducers import Apply
from attnprobe.hooks.sites import Site
from attnprobe.probe import texts
from attnprobe.probe.rundir import write_json, write_parquet

from attnprobe.analyses import tasks as recall_tasks
from attnprobe.analyses.stats import check_sample_size, mean_interval, wilson_interval

from attnprobe.analyses.experiments.config import MODES, AblateConfig
from attnprobe.analyses.experiments.selection import Head, by_layer, parse_heads, top_heads



def head_means(backend: Backend, model: Model, layers: Sequence[int], n_tokens: int = 1024,
               bos: bool = False) -> dict[int, torch.Tensor]:
    """Mean per-head output z (H, d) of each layer over reference text from the fit range (never
    evaluated on), with BOS when the run uses it, as its evaluations do."""
    ids = texts.windows(texts.fit_ids(model.tokenizer, n_tokens), n_tokens, model.info.bos_id if bos else None)
    readers = {layer: Apply(lambda z: z.float().mean(dim=(0, 1)).cpu()) for layer in layers}
    backend.run(ids, reads={(layer, Site.Z): r for layer, r in readers.items()})
    return {layer: r.result()[0] for layer, r in readers.items()}


def calibrate_sinks(layer: int, heads: Sequence[int], beta: float = 0.4, threshold: float = 0.1,
                    min_queries: int = 16) -> Edit:
    """ACT's calibration: on each prefill, keys k > 0 with alpha_k > threshold (seen by >= min_queries
    queries) are the hidden sinks; each query gives a sink exactly beta times its weight and hands the
    removed mass to the other keys it sees in proportion to their weights, so a row still sums to 1.
    A row that sees only sinks keeps its weights. Decode steps reuse the prefill's sink positions."""
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
        sink_mask = sinks[:, :, None, :]
        removed = ((1 - beta) * probs * sink_mask).sum(dim=-1, keepdim=True)
        others = (probs * ~sink_mask).sum(dim=-1, keepdim=True)
        gain = torch.where(others > 0, 1 + removed / others.clamp_min(torch.finfo(probs.dtype).tiny), 1.0)
        keep_row = others > 0  # a row with nothing but sinks is left as it is
        calibrated = torch.where(sink_mask, beta * probs, probs * gain)
        state["call"], state["weights"] = call, torch.where(keep_row, calibrated, probs)
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


def ablation_edits(model: Model, backend: Backend, heads: Sequence[Head], mode: str, beta: float = 0.4,
                   bos: bool = False) -> list[Edit]:
    if mode not in MODES:
        raise AttnprobeError(f"unknown ablation mode '{mode}': choose one of {', '.join(MODES)}")
    grouped = by_layer(list(heads))
    if mode == "zero":
        return [zero_heads(layer, hs) for layer, hs in grouped.items()]
    if mode == "uniform":
        return [uniform_heads(layer, hs) for layer, hs in grouped.items()]
    if mode == "calibrate":
        return [calibrate_sinks(layer, hs, beta) for layer, hs in grouped.items()]
    means = head_means(backend, model, list(grouped), bos=bos)
    return [mean_heads(layer, hs, means[layer]) for layer, hs in grouped.items()]


Task = Callable[[Model, str], pd.DataFrame]  # (model, variant label) -> rows with a boolean `correct`
DEFAULT_DRAWS = 10
EXCLUDED_SHARE = 0.1  # random heads come from outside the top 10 % (the reference excludes 100 of 1,024)


def evaluate(model: Model, backend: Backend, edits: Sequence[Edit], task: Task, label: str) -> pd.DataFrame:
    with backend.patched(list(edits)):
        return task(model, label)


def ranking_needles(run_dir: Path) -> int:
    """How many of the packaged needles (the first ones) the census in `run_dir` ranked heads with."""
    if run_dir is None:
        raise AttnprobeError("the sweep ranks heads by a census run: add --from RUN_DIR")
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.exists():
        raise AttnprobeError(f"{manifest} not found: the sweep needs the census run that ranked the heads")
    needles = json.loads(manifest.read_text()).get("config", {}).get("needles")
    if not isinstance(needles, int):
        raise AttnprobeError(f"{manifest} does not say which needles ranked the heads: rerun the census")
    return needles


def recall_task(name: str, lengths: Sequence[int], depths: Sequence[float], bos: bool | None = None,
                run_dir: Path | None = None, samples: int = 2, on_gpu: bool = False, allow_small: bool = False) -> Task:
    """Registry task `name` at `lengths`, `samples` per length and depth (a task without depths:
    `samples` x len(depths) per length). NIAH with `run_dir` evaluates on what did not rank the heads:
    every needle the census there left out, in haystacks from the evaluation text range. Too few
    samples for an interval are refused here (`stats.check_sample_size`), before any model work."""
    ranking = ranking_needles(run_dir) if run_dir is not None and name == "niah" else recall_tasks.Setting().ranking_needles
    setting = recall_tasks.Setting(bos=bos, depths=tuple(depths), ranking_needles=ranking)
    per_depth = len(recall_tasks.pools.evaluation_needles(ranking)) if run_dir is not None and name == "niah" else samples
    n = per_depth * len(depths)
    check_sample_size(n * len(lengths), f"{name} ({n * len(lengths)} samples per configuration)", on_gpu, allow_small)
    return lambda model, label: recall_tasks.evaluate(model, name, lengths, n, variant=label, setting=setting)


def _summary_row(task: str, selection: str, k: int, seed: int, group: pd.DataFrame) -> dict:
    correct, total = int(group["correct"].sum()), len(group)
    low, high = wilson_interval(correct, total)
    return {"task": task, "selection": selection, "k": int(k), "seed": int(seed), "accuracy": correct / total,
            "n": total, "ci_low": low, "ci_high": high, "interval": "wilson"}


def _draws_row(task: str, k: int, group: pd.DataFrame) -> dict:
    """The random baseline of one K over its draws: the mean of the draws' accuracies with a t interval
    over them, so the spread between draws (which heads were drawn) counts, not only the samples'."""
    accuracies = group.groupby("seed")["correct"].mean()
    mean, low, high = mean_interval(accuracies.tolist())
    return {"task": task, "selection": "random-pooled", "k": int(k), "seed": -1, "accuracy": mean, "n": len(group),
            "ci_low": low, "ci_high": high, "interval": f"t over {len(accuracies)} draws"}


class SweepCells:
    """A sweep's finished configurations, one parquet each under `folder`, so an interrupted sweep resumes.
    `settings` (what the task and masking were) is written once; a folder of another sweep is refused.
    `texts.json` keeps the text ranges the finished cells read (a fully resumed run reads none)."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "settings.json"
        if config.exists() and json.loads(config.read_text()) != json.loads(json.dumps(settings)):
            raise AttnprobeError(f"{self.folder} holds a sweep with other settings: give another --out, or delete it to start over")
        write_json(config, settings)

    def get(self, label: str) -> pd.DataFrame | None:
        path = self.folder / f"{label}.parquet"
        return pd.read_parquet(path) if path.exists() else None

    def put(self, label: str, rows: pd.DataFrame, used: list[dict]) -> None:
        write_parquet(self.folder / f"{label}.parquet", rows)
        write_json(self.folder / "texts.json", texts.summarise(self.texts() + used))

    def texts(self) -> list[dict]:
        path = self.folder / "texts.json"
        return json.loads(path.read_text()) if path.exists() else []


def masking_sweep(model: Model, backend: Backend, run_dir: Path, ks: Sequence[int], draws: int = DEFAULT_DRAWS,
                  task: Task | None = None, mode: str = "uniform", score: str = "retrieval_score",
                  exclude_top: int | None = None, bos: bool = False,
                  progress: Callable[[str], None] | None = None,
                  cells: SweepCells | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mask the top-K heads by `score` and, `draws` times per K, K random heads drawn outside the top
    `exclude_top` (default: 10 % of all heads, at least max(K)).

    `task` should not be what ranked the heads (`recall_task("niah", ..., run_dir=run_dir)`). With `cells`,
    each finished configuration is saved and a rerun evaluates only the missing ones. Returns (summary:
    task, selection, k, seed, accuracy, n, ci_low, ci_high, interval with one Wilson row per draw and a
    'random-pooled' row per K: the mean over draws with a t interval over the draws' accuracies; every
    sample's row, without the model's responses)."""
    if task is None:
        raise AttnprobeError("give the sweep a task, e.g. recall_task('niah', lengths, depths, run_dir=run_dir)")
    progress = progress or (lambda message: None)

    def cell(label: str, heads: Sequence[Head], **columns) -> pd.DataFrame:
        saved = cells.get(label) if cells else None
        if saved is not None:
            return saved
        with texts.recording() as used:
            edits = ablation_edits(model, backend, heads, mode, bos=bos) if heads else []
            rows = evaluate(model, backend, edits, task, label).assign(**columns).drop(columns=["response"], errors="ignore")
        if cells:
            cells.put(label, rows, used)
        return rows

    info = model.info
    total = info.n_layers * info.n_heads
    exclude_top = max(max(ks), round(EXCLUDED_SHARE * total)) if exclude_top is None else exclude_top
    if exclude_top + max(ks) > total:
        raise AttnprobeError(f"cannot draw {max(ks)} random heads outside the top {exclude_top} of {total}: lower --exclude-top")
    banned = ",".join(f"{layer}.{head}" for layer, head in top_heads(run_dir, exclude_top, score))
    samples = [cell("original", [], selection="none", k=0, seed=-1)]
    progress("original")
    for k in ks:
        samples.append(cell(f"top-{k}", top_heads(run_dir, k, score), selection="top", k=k, seed=-1))
        progress(f"top-{k}")
        for seed in range(draws):
            chosen = parse_heads(f"random:{k}", info, run_dir, seed, exclude=banned or None)
            samples.append(cell(f"random-{k}-s{seed}", chosen, selection="random", k=k, seed=seed))
            progress(f"random-{k} draw {seed + 1}/{draws}")
    rows = pd.concat(samples, ignore_index=True)
    summary = wilson_summary(rows)
    randoms = rows[rows["selection"] == "random"]
    pooled = [_draws_row(t, k, group) for (t, k), group in randoms.groupby(["task", "k"])]
    return pd.concat([summary, pd.DataFrame(pooled)], ignore_index=True), rows


def wilson_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (task, selection, k, seed) of sample rows with a boolean `correct`, with its 95 % Wilson interval."""
    return pd.DataFrame([_summary_row(t, s, k, seed, group)
                         for (t, s, k, seed), group in rows.groupby(["task", "selection", "k", "seed"])])


def run_ablation(model: Model, config: AblateConfig, out: Path, heads: str | None, layers: str | None, from_run: Path | None,
                 exclude: str | None, progress: Callable[[str], None] = lambda m: None,
                 say: Callable[[str], None] = lambda m: None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The ablate command: the chosen heads against the original, or the top-K / random-K sweep (each finished
    configuration kept under OUT/sweep_cells, so a rerun resumes). Returns (summary, samples, manifest entries)."""
    from attnprobe.hooks.backends import make_backend
    from attnprobe.probe.census import resolve_bos

    window = model.info.max_context
    if window and max(config.lengths) + 64 > window:  # a prompt is the haystack plus its question and template
        raise AttnprobeError(f"--lengths {max(config.lengths)} does not fit the model's window of {window} tokens "
                             f"(keep lengths <= {window - 64})")
    bos = resolve_bos("auto", model)
    lengths, depths = list(config.lengths), list(config.depths)
    # a sweep's NIAH: needles and haystack the census did not rank heads with
    run_task = recall_task(config.task, lengths, depths, bos, from_run if config.sweep else None, config.samples,
                           model.device.type == "cuda", config.allow_small)

    backend = make_backend("native", model)
    with texts.recording() as used_text:  # the text ranges this run reads, for its manifest
        if config.sweep:
            ks = list(config.sweep)
            cells = SweepCells(out / "sweep_cells", {"ks": ks, "draws": config.seeds, "mode": config.mode, "score": config.score,
                                                     "exclude_top": config.exclude_top, "task": config.task, "samples": config.samples, "lengths": lengths,
                                                     "depths": depths, "bos": bos, "census": str(Path(from_run).resolve()),
                                                     "weights": model.info.weights_sha256})
            summary, rows = masking_sweep(model, backend, from_run, ks, config.seeds, run_task, config.mode, config.score,
                                          config.exclude_top, bos, progress=lambda message: progress(f"sweep: {message}"), cells=cells)
            used_text.extend(cells.texts())  # the ranges the resumed cells read in an earlier run
            label = f"sweep {ks} by {config.score}"
        else:
            chosen = parse_heads(heads, model.info, from_run, config.seed, exclude, layers)
            say(f"ablating {len(chosen)} heads ({config.mode}): " + ", ".join(f"{l}.{h}" for l, h in chosen[:20])
                + (" ..." if len(chosen) > 20 else ""))
            original = evaluate(model, backend, [], run_task, "original").assign(selection="none", k=0, seed=-1)
            ablated = evaluate(model, backend, ablation_edits(model, backend, chosen, config.mode, bos=bos), run_task,
                               "ablated").assign(selection="chosen", k=len(chosen), seed=config.seed)
            rows = pd.concat([original, ablated], ignore_index=True)
            summary = wilson_summary(rows)
            label = ",".join(f"{l}.{h}" for l, h in chosen)
    return summary, rows.drop(columns=["response"], errors="ignore"), {
        "command": "ablate", "mode": config.mode, "heads": label, "task": config.task, "lengths": lengths, "depths": depths,
        "bos": bos, "texts": texts.summarise(used_text)}
