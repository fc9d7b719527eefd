"""A conversion run in parts, each resumable in the same run directory, so one long run spreads over several
calls or machines (a GPU converts, anything evaluates):

    data      the training windows (self-samples are cached, so a later part or process reads them back)
    convert   each row, then the control, two stages each; one row's failure (a kernel's backward, memory) is
              recorded and does not cost the other rows; each finished row can be packed for transport
    finish    each row stopped in stage 2 becomes a partial conversion from its last checkpoint
    evaluate  the matrix code on the original and every converted row, with the gate (no training data needed)
    census    the matrix's small census inside the original and every converted row

Every finished step appends one line to the run log (results.jsonl in `out`).
"""
from __future__ import annotations

import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model
from attnprobe.probe.rundir import read_json

from attnprobe.analyses.conversion import rows
from attnprobe.analyses.conversion.checkpoint import CHECKPOINT, CONVERSION
from attnprobe.analyses.conversion.train import ConvertConfig, conversion_from_checkpoint, stage_data_windows

PARTS = ("data", "convert", "finish", "evaluate", "census")
TAR_LIMIT = 15 * 2 ** 20  # what one transfer from a GPU machine may carry


class RunLog:
    """results.jsonl in `out`, appended and flushed line by line (a call cut short keeps what it finished)."""

    def __init__(self, out: Path, echo: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.path, self.echo = Path(out) / "results.jsonl", echo

    def add(self, kind: str, **record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, "time": time.strftime("%H:%M:%S"), **record}, default=str) + "\n")
        self.echo(f"{kind} {json.dumps(record, default=str)[:400]}")


def check_parts(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(PARTS)) or ([] if chosen else ["none"])
    if unknown:
        raise AttnprobeError(f"unknown part(s) {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    return chosen


def _mean(errors: dict) -> float | None:
    values = [v for per_layer in errors.values() for v in per_layer]
    return sum(values) / len(values) if values else None


def convert_each(model: Model, backend, variants: Sequence, config: ConvertConfig, data, run: Path, log: RunLog,
                 recompute_layers: bool = False, after_row: Callable[[], None] = lambda: None) -> list:
    """Convert every variant into run/conversions/NAME, one at a time, recording each; a row that fails is
    recorded and skipped (the control's failure is raised: nothing can be gated without it). Returns the
    variants that converted."""
    from attnprobe.kernels import fla

    done = []
    for variant in variants:
        began = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        last, rates = {}, []

        def on_step(progress, label, last=last, rates=rates):
            last.update(stage=progress.stage, step=progress.step, steps=progress.steps, loss=progress.loss,
                        tokens_per_s=round(progress.tokens_per_s))
            if progress.stage == "end_to_end":
                rates.append(progress.tokens_per_s)
        try:
            rows.conversion_matrix(model, backend, [variant], config, data, run, None, evaluate=False, on_step=on_step,
                                   recompute_layers=recompute_layers)
        except Exception as error:
            if variant.name == rows.CONTROL:
                raise
            log.add("failed", row=variant.name, error=f"{type(error).__name__}: {error}"[:2000], last_step=last)
            continue
        manifest = read_json(run / "conversions" / variant.name / CONVERSION)
        log.add("converted", row=variant.name, seconds=round(time.perf_counter() - began, 1), budget=manifest["budget"],
                first_batch_kl=manifest["losses"].get("first_batch_kl"), last_step=last,
                stage2_median_tokens_per_s=round(sorted(rates)[len(rates) // 2]) if rates else None,
                transfer_loss=(manifest["losses"].get("transfer") or [None])[-1:], mean_head_error=_mean(manifest["head_error"]),
                fla_backward_errors={str(key): error for key, error in fla.backward_errors.items()},
                peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None)
        done.append(variant)
        after_row()
    return done


def finish_partial(model: Model, variants: Sequence, run: Path, log: RunLog) -> None:
    """Each row stopped in stage 2 (a checkpoint, no conversion.json) becomes a partial conversion."""
    for variant in variants:
        directory = run / "conversions" / variant.name
        if (directory / CHECKPOINT).exists() and not (directory / CONVERSION).exists():
            manifest = conversion_from_checkpoint(model, directory)
            log.add("finished from checkpoint", row=variant.name, partial=manifest["partial"], budget=manifest["budget"])


def pack_conversions(run: Path, names: Sequence[str], out: Path, limit: int = TAR_LIMIT) -> list[Path]:
    """Each finished row's fit/, adapters and manifest (no checkpoints) into out/conversions-N.tar of at most
    `limit` bytes, paths relative to `run` (unpack into another run directory to evaluate there)."""
    groups: list[list[Path]] = [[]]
    size = 0
    for name in names:
        folder = run / "conversions" / name
        if not (folder / CONVERSION).exists():
            continue
        files = [f for f in (folder / CONVERSION, folder / "adapters.safetensors", *sorted((folder / "fit").glob("*"))) if f.exists()]
        row_size = sum(f.stat().st_size for f in files)
        if groups[-1] and size + row_size > limit:
            groups.append([])
            size = 0
        groups[-1] += files
        size += row_size
    written = []
    for index, group in enumerate(g for g in groups if g):
        target = Path(out) / f"conversions-{index + 1}.tar"
        with tarfile.open(str(target) + ".partial", "w") as tar:
            for file in group:
                tar.add(file, arcname=str(file.relative_to(run)))
        os.replace(str(target) + ".partial", target)
        written.append(target)
    return written


@dataclass
class Plan:
    """What a parts run converts and how: the rows (the control first when it is on) and the recipe."""

    variants: list
    config: ConvertConfig
    epochs: int = 1
    sample_batch: int | None = None
    recompute_layers: bool = False
    pack: bool = False  # tar each finished row into `out` (for transport off a GPU machine)
    retrieval: object = None  # a retrieval_data.RetrievalMix to mix into the training windows
    paths: Sequence[Path] = ()  # training text files (default: self-samples mixed with the prose's training range)
    dataset: str | None = None


def run_parts(model: Model, backend, parts: Sequence[str], plan: Plan, run: Path, out: Path, sizes, log: RunLog) -> dict:
    """Run `parts` (in PARTS' order) of `plan` in the run directory `run`; tables and the log go to `out`.
    `sizes(**overrides)` gives the MatrixSizes (evaluate runs without the census, the census part on its own).
    Returns {"matrix": table, "census": table} for the parts that made them."""
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.analyses.experiments.architectures import matrix_markdown

    run, out, config, variants = Path(run), Path(out), plan.config, list(plan.variants)
    parts = [part for part in PARTS if part in parts]
    made = {}
    if {"data", "convert"} & set(parts):  # evaluating reads the conversions' own manifests, not this plan
        log.add("plan", tokens=config.tokens, transfer_tokens=config.transfer_tokens, rows=[v.name for v in variants])
        began = time.perf_counter()
        steps = config.steps(config.transfer_tokens) + config.steps(config.tokens)
        data = training_data(model, steps * config.batch * config.length, config.length, plan.paths, plan.dataset,
                             config.seed, plan.epochs, sample_batch=plan.sample_batch)
        if plan.retrieval is not None:
            from attnprobe.analyses.conversion.retrieval_data import mix_retrieval

            data = mix_retrieval(model, data, plan.retrieval, *stage_data_windows(config), seed=config.seed)
        log.add("data", seconds=round(time.perf_counter() - began, 1), **data.description)
    if "convert" in parts:
        names = [v.name for v in variants]
        variants = convert_each(model, backend, variants, config, data, run, log, plan.recompute_layers,
                                after_row=lambda: pack_conversions(run, names, out) if plan.pack else None)
    if "finish" in parts:
        finish_partial(model, variants, run, log)
    if "evaluate" in parts:
        def status(message):  # each evaluated row reaches `out` before the next starts
            if message.startswith("evaluating") and (run / "variants").exists():
                finished = [read_json(f) for f in sorted((run / "variants").glob("*.json"))]
                (out / "rows.json").write_text(json.dumps(finished, default=str))
            print(message, flush=True)
        table, _ = rows.evaluate_conversions(model, backend, variants, run, sizes(census=False), None, status)
        table.to_parquet(out / "matrix.parquet", index=False)
        (out / "matrix.md").write_text(matrix_markdown(table.drop(columns=["conversion"], errors="ignore")))
        shown = [c for c in ("architecture", "perplexity", "ppl_vs_control", "gate", "passkey_acc", "kv_recall_acc", "copy_acc",
                             "niah_acc") if c in table]
        log.add("matrix", rows=table[shown].to_dict("records"))
        made["matrix"] = table
    if "census" in parts:
        table = rows.census_of_conversions(model, backend, variants, run, sizes(), None, status=lambda m: print(m, flush=True))
        table.to_parquet(out / "census.parquet", index=False)
        log.add("census", rows=table.to_dict("records"))
        made["census"] = table
    return made
