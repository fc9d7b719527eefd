"""Named conversion rows, the fine-tuned control and the gated matrix: converting, evaluating and censusing rows."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import Backend
from attnprobe.hooks.model import Model
from attnprobe.kernels.registry import make_kernel
from attnprobe.probe.rundir import RunDir, census_heads, read_json, readable, same_settings, write_json

from attnprobe.analyses.conversion.checkpoint import CONVERSION
from attnprobe.analyses.conversion.data import TrainingData
from attnprobe.analyses.conversion.train import ConvertConfig, Progress, applied, convert

# ---- named rows, the control and the gated matrix ----------------------------------------------------------

CONTROL = "control"


def control_variant():
    from attnprobe.analyses.experiments.architectures import Variant, _none

    return Variant(CONTROL, None, _none, "softmax, fine-tuned: the original through the identical stage 2")


def replaced_heads(model: Model, keep: set[tuple[int, int]]) -> dict[int, list[int]]:
    """{layer: heads replaced}, every head not kept softmax."""
    info = model.info
    return {layer: [h for h in range(info.n_heads) if (layer, h) not in keep] for layer in range(info.n_layers)
            if any((layer, h) not in keep for h in range(info.n_heads))}


def parse_tokens(text: str) -> int:
    """'20M', '512K', '1.5M' or '1000' -> a token count."""
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
    text = str(text).strip().upper()
    try:
        return int(float(text[:-1]) * scale[text[-1]]) if text and text[-1] in scale else int(text)
    except (ValueError, OverflowError):  # OverflowError: infM
        raise AttnprobeError(f"cannot read a token count from '{text}': use e.g. 20M, 512K or 100000") from None


def recipe(tokens: str, transfer_tokens: str, **fields) -> ConvertConfig:
    """The conversion recipe from the command's options (token budgets as text, e.g. 20M), every value checked:
    the command calls it before any model loads."""
    return ConvertConfig(tokens=parse_tokens(tokens), transfer_tokens=parse_tokens(transfer_tokens), **fields)


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
                      status: Callable[[str], None] = lambda m: None, recompute_layers: bool = False):
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
                recompute_layers=recompute_layers)
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


def evaluate_conversions(model: Model, backend: Backend, variants: Sequence, out: Path, sizes, heads_table=None,
                         status: Callable[[str], None] = lambda m: None):
    """Evaluate the original and each variant converted into out/conversions/NAME (resumable per row, each
    finished row in out/variants/) through the matrix code, with the gate: (matrix table, recall rows).
    Needs no training data, so conversions made on one machine are evaluated on another."""
    import pandas as pd

    from attnprobe.analyses.experiments.architectures import evaluate_variant, gate_columns

    out = Path(out)
    _same_sizes(out / "variants", sizes)
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


def run(model: Model, out: Path, **options):
    """The `attnprobe convert` command (see `_run`), holding `out` for this run: a second convert into the same
    directory is refused, not interleaved (under accelerate launch, the main process holds it for all)."""
    from accelerate import PartialState

    with RunDir(out).lock() if PartialState().is_main_process else nullcontext():
        return _run(model, Path(out), **options)


def _run(model: Model, out: Path, *, kernel: str | None, heads: str | None, layers: str | None, from_run: Path | None,
        variants: str | None, control: bool, tokens: str, transfer_tokens: str, length: int, batch: int, accumulation: int,
        lr: float, transfer_lr: float, train: str, lora_rank: int, ce_weight: float, data: Sequence[Path],
        dataset: str | None, epochs: int, seed: int, checkpoint_every: int, evaluate: bool, census: bool, quick: bool,
        console=None, recompute_layers: bool = False):
    """The `attnprobe convert` command: check everything, gather the data, convert every row, evaluate, write the matrix."""

    from attnprobe.hooks.backends import make_backend
    from attnprobe.kernels.registry import KERNELS
    from attnprobe.probe.rundir import write_parquet

    from attnprobe.analyses.experiments.architectures import MatrixSizes, Variant, catalogue, matrix_markdown
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.analyses.experiments.selection import parse_heads

    heads_table = census_heads(from_run) if from_run is not None else None
    names = catalogue(model)
    chosen = []
    if variants:
        wanted = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in names]
        if unknown:
            raise AttnprobeError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(names)}")
        chosen = [names[v] for v in wanted if v != "original"]
    if kernel is not None or heads or layers:
        if kernel not in KERNELS:
            raise AttnprobeError(f"unknown kernel '{kernel}': choose one of {', '.join(KERNELS)}")
        replaced = set(parse_heads(heads, model.info, from_run, seed, None, layers or (None if heads else f"0-{model.info.n_layers - 1}")))
        everyone = {(l, h) for l in range(model.info.n_layers) for h in range(model.info.n_heads)}
        chosen.append(Variant(f"convert-{kernel}", kernel, lambda m, t, keep=everyone - replaced: keep, f"{len(replaced)} heads {kernel}"))
    if not chosen and not control:
        raise AttnprobeError("say what to convert: --variants NAMES, or --kernel K with --heads/--layers (or keep --control)")
    if control:
        chosen.append(control_variant())
    config = recipe(length=length, batch=batch, accumulation=accumulation, transfer_tokens=transfer_tokens, tokens=tokens,
                    transfer_lr=transfer_lr, lr=lr, train=train, lora_rank=lora_rank, ce_weight=ce_weight,
                    checkpoint_every=checkpoint_every, seed=seed)
    from accelerate import PartialState

    state = PartialState()
    config.check(state.num_processes)
    for variant in chosen:  # every kernel and head selection is checked before anything trains
        if variant.kernel:
            make_kernel(variant.kernel, 1, model.info.head_dim)
            variant.keep(model, heads_table)
    steps = config.steps(config.transfer_tokens) + config.steps(config.tokens)
    bar, on_step = progress_bar(console, disable=not state.is_main_process)
    with bar:
        sampling = bar.add_task("training data", total=None, speed="", loss="")
        with state.main_process_first():  # the main process samples and caches; the others read its shards
            training = training_data(model, steps * config.batch * config.length, config.length, data, dataset, seed, epochs,
                                     progress=lambda done, total: bar.update(sampling, completed=done, total=total))
        bar.update(sampling, visible=False)
        sizes = MatrixSizes.quick(census=census) if quick else MatrixSizes(census=census)
        backend = make_backend("native", model)
        table, recall = conversion_matrix(model, backend, chosen, config, training, out, sizes, heads_table, evaluate,
                                          on_step=on_step, recompute_layers=recompute_layers)
    if table is None:
        return None
    write_parquet(out / "matrix.parquet", table)
    write_parquet(out / "recall.parquet", recall)
    (out / "matrix.md").write_text(matrix_markdown(table.drop(columns=["conversion"], errors="ignore")))
    return table

