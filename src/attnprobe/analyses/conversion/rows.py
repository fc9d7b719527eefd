"""Named conversion rows, the fine-tuned control and the gated matrix: converting, evaluating and censusing rows."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import Backend
from attnprobe.hooks.model import Model
from attnprobe.probe.rundir import read_json, readable, same_settings, write_json

from attnprobe.analyses.conversion.checkpoint import CONVERSION
from attnprobe.analyses.conversion.data import TrainingData
from attnprobe.analyses.conversion.stage2 import FastPath
from attnprobe.analyses.conversion.train import ConvertConfig, Progress, applied, convert

# ---- named rows, the control and the gated matrix ----------------------------------------------------------

CONTROL = "control"


def control_variant():
    from attnprobe.analyses.experiments.variants import Variant, _none

    return Variant(CONTROL, None, _none, "softmax, fine-tuned: the original through the identical stage 2")


def replaced_heads(model: Model, keep: set[tuple[int, int]]) -> dict[int, list[int]]:
    """{layer: heads replaced}, every head not kept softmax."""
    info = model.info
    return {layer: [h for h in range(info.n_heads) if (layer, h) not in keep] for layer in range(info.n_layers)
            if any((layer, h) not in keep for h in range(info.n_heads))}


def progress_bar(console=None, disable: bool = False):
    """A rich progress bar and the `on_step` callback that drives it: step, tokens/s, loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Bar(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
              TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
              disable=disable)
    tasks: dict[str, int] = {}

    def on_step(report: Progress, label: str = "") -> None:
        key = f"{label} {report.stage}".strip()
        if key not in tasks:
            tasks[key] = bar.add_task(key, total=report.steps, speed="", loss="")
        bar.update(tasks[key], completed=report.step, speed=f"{report.tokens_per_s:,.0f} tok/s", loss=f"{report.loss:.4g}")
    return bar, on_step


def conversion_matrix(model: Model, backend: Backend, variants: Sequence, config: ConvertConfig, data: TrainingData,
                      out: Path, sizes, heads_table=None, evaluate: bool = True,
                      on_step: Callable[[Progress, str], None] = lambda p, label: None,
                      status: Callable[[str], None] = lambda m: None, recompute_layers: bool = False, fast: FastPath | None = None):
    """Convert each variant (and the control) into out/conversions/NAME, then evaluate every row through the
    matrix code with the gate: (matrix table, recall rows); (None, None) without `evaluate` or off the main process."""
    import dataclasses

    out = Path(out)
    rows_to_convert = [v for v in variants if v.name != "original"]
    for variant in rows_to_convert:
        heads = replaced_heads(model, variant.keep(model, heads_table)) if variant.kernel else {}
        status(f"converting {variant.name}")
        convert(model, backend, heads, dataclasses.replace(config, kernel=variant.kernel), data,
                out / "conversions" / variant.name, on_step=lambda report, name=variant.name: on_step(report, name),
                recompute_layers=recompute_layers, fast=fast)
    from accelerate import PartialState

    if not evaluate or not PartialState().is_main_process:
        return None, None
    return evaluate_conversions(model, backend, rows_to_convert, out, sizes, heads_table, status)


def _with_original(model: Model, variants: Sequence) -> list:
    """The original first, then the variants (a reference row is never converted)."""
    from attnprobe.analyses.experiments.architectures import catalogue

    return [catalogue(model)["original"], *[v for v in variants if v.name != "original"]]


def _conversion_of(model: Model, out: Path, variant):
    """The context that puts `variant`'s conversion into the model (the original has none)."""
    return applied(model, out / "conversions" / variant.name) if variant.name != "original" else nullcontext()


def _same_sizes(folder: Path, sizes) -> None:
    """Rows saved in `folder` are reused by a rerun, so they must have been measured at these sizes."""
    same_settings(folder.with_name(f"{folder.name}.sizes.json"), asdict(sizes), f"the rows in {folder.name}/",
                  started=folder.exists() and any(folder.glob("*.json")), noun="sizes")


def _stage2(manifest: dict) -> dict:
    """What a row's stage 2 trained on: the data, the planned budget in tokens, the sequence length."""
    config = ConvertConfig(**manifest["config"])
    return {"data": manifest["data"]["sha256"], "budget": config.steps(config.tokens) * config.batch * config.length,
            "length": config.length}


def same_stage2_as_control(out: Path, variants: Sequence) -> None:
    """Refuse to gate a row against a control trained on other data, another stage-2 budget or another sequence
    length: the gate compares the two rows' perplexities as if only the architecture differed. (A row taken from
    a checkpoint is compared at its planned budget; its `partial` column says where it stopped.)"""
    control = out / "conversions" / CONTROL / CONVERSION
    if CONTROL not in {v.name for v in variants} or not control.exists():
        return
    wanted = _stage2(read_json(control))
    for variant in variants:
        if variant.name in (CONTROL, "original"):
            continue
        got = _stage2(read_json(out / "conversions" / variant.name / CONVERSION))
        differs = [key for key in wanted if got[key] != wanted[key]]
        if differs:
            raise AttnprobeError(f"row {variant.name} and the control trained stage 2 with another {' and '.join(differs)}: "
                                 "convert both in one run (same data, --tokens and --length) before comparing them")


def evaluate_conversions(model: Model, backend: Backend, variants: Sequence, out: Path, sizes, heads_table=None,
                         status: Callable[[str], None] = lambda m: None):
    """Evaluate the original and each variant converted into out/conversions/NAME (resumable per row, each
    finished row in out/variants/) through the matrix code, with the gate: (matrix table, recall rows).
    Needs no training data, so conversions made on one machine are evaluated on another."""
    import pandas as pd

    from attnprobe.analyses.experiments.architectures import evaluate_variant, gate_columns

    out = Path(out)
    _same_sizes(out / "variants", sizes)
    same_stage2_as_control(out, variants)
    rows, samples = [], []
    for variant in _with_original(model, variants):
        done = out / "variants" / f"{variant.name}.json"
        if readable(done) and readable(done.with_suffix(".parquet")):  # resume: a finished row is not evaluated again
            rows.append(read_json(done))
            samples.append(pd.read_parquet(out / "variants" / f"{variant.name}.parquet"))
            continue
        status(f"evaluating {variant.name}")
        with _conversion_of(model, out, variant) as fit:
            row, recall = evaluate_variant(model, backend, variant, heads_table, out, sizes, status, fit=fit)
        if variant.name != "original":
            row["conversion"] = str(out / "conversions" / variant.name)
            manifest = read_json(out / "conversions" / variant.name / CONVERSION)
            row["stage2_tokens"] = manifest["budget"]["tokens"]
            if "partial" in manifest:  # taken from a checkpoint: say so beside its numbers
                row["partial"] = f"step {manifest['partial']['step']} of {manifest['partial']['steps']}"
        from attnprobe.probe.rundir import write_parquet

        write_parquet(out / "variants" / f"{variant.name}.parquet", recall.drop(columns=["response"], errors="ignore"))
        write_json(done, row)
        rows.append(row)
        samples.append(recall)
    table = gate_columns(pd.DataFrame(rows), model.info.n_layers * model.info.n_heads)
    return table, pd.concat(samples, ignore_index=True).drop(columns=["response"], errors="ignore")


def census_of_conversions(model: Model, backend: Backend, variants: Sequence, out: Path, sizes, heads_table=None,
                          status: Callable[[str], None] = lambda m: None):
    """The small census of the matrix (`census_presence`) re-run inside the original and each variant converted
    into out/conversions/NAME: which mechanisms each converted architecture keeps, measured in its own heads
    (effective attention for the linear ones). Each row is saved in out/census/NAME.json (a rerun resumes);
    returns the table (architecture and the census columns)."""
    import pandas as pd

    from attnprobe.probe.census import resolve_bos

    from attnprobe.analyses.experiments.architectures import census_presence, variant_edits

    out = Path(out)
    bos = resolve_bos(sizes.bos, model)
    _same_sizes(out / "census", sizes)
    rows = []
    for variant in _with_original(model, variants):
        done = out / "census" / f"{variant.name}.json"
        if not readable(done):  # missing, or damaged: measured again
            status(f"census of {variant.name}")
            with _conversion_of(model, out, variant) as fit:
                edits = variant_edits(model, fit, variant.keep(model, heads_table)) if variant.kernel else []
                with backend.standing_edits(edits):
                    columns = census_presence(model, backend, out / "census" / variant.name, sizes, bos)
            write_json(done, {"architecture": variant.name, **columns})
        rows.append(read_json(done))
    return pd.DataFrame(rows)
