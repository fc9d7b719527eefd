"""The `attnprobe` command line. User errors print one line and exit 2; no tracebacks.

Each command's settings are one config dataclass, and its options are built from that class's fields
(analyses/cli_options.py says how: a new field with a help text is a new option, with no edit here). Options are
parsed and range-checked (the dataclasses' `__post_init__`) before any model loads or anything is written, and
`--help` and option errors answer without importing torch, transformers or pandas. Every message is printed
literally (no rich markup), so paths and hints such as `pip install -e '.[qwen]'` reach the user whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from attnprobe.analyses.cli_options import config_options, listed, run_dir, with_preset
from attnprobe.analyses.conversion.config import ConvertConfig
from attnprobe.analyses.experiments.config import AblateConfig, BudgetSizes, MatrixSizes
from attnprobe.analyses.experiments.variants import VARIANT_NAMES, check_kernel, requested
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.embedded import MODELS as EMBEDDED_MODELS
from attnprobe.kernels.names import KERNELS, names
from attnprobe.probe import declared
from attnprobe.probe.config import CensusConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help=f"attnprobe: find attention mechanisms ({', '.join(declared.declared().labels)}) in a softmax model, "
                       f"ablate heads or replace them with {', '.join(k for k in ('linear', 'hybrid', 'sparse') if names(k))} "
                       "kernels, convert them by training, and measure what is lost.")
console = Console(markup=False, highlight=False)  # every message literally: a path or hint holding [...] stays whole
errors = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)  # an error stays on one line
ModelOption = typer.Option("smollm2-135m", "--model", "-m",
                           help=", ".join(EMBEDDED_MODELS) + " (embedded), a local HF directory, a .gguf file, or a hub id")
BackendOption = typer.Option("native", "--backend", "-b", help="native | transformer-lens | nnsight")
KernelOption = typer.Option(None, "--kernel", help="the kernel replacing --heads/--layers: " + ", ".join(KERNELS))
HeadsOption = typer.Option(None, "--heads", help="3.1,7.4 | top:K:SCORE (needs --from) | random:K | all")
LayersOption = typer.Option(None, "--layers", help="every head of these layers: 0-29, 3,5,7 or 0-29:every4")
FromOption = typer.Option(None, "--from", help="census run directory whose heads.parquet ranks heads")
VariantsOption = typer.Option(None, "--variants", help="comma-separated named architectures: " + ", ".join(VARIANT_NAMES))


def OutOption(kind: str, resume: str = "; rerun to resume"):
    return typer.Option(None, "--out", "-o", help=f"run directory (default: runs/{kind}-MODEL-TIME){resume}")


LOAD_OPTIONS: dict = {}  # set once by the app's options (dtype, device, device_map)
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


@app.callback()
def main_options(
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16: the dtype the model runs in"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when present)"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto | balanced: spread a model too large for one GPU over the GPUs (accelerate)"),
    torch_kernels: bool = typer.Option(False, "--torch-kernels", help="use the torch paths even on CUDA, not the Triton kernels"),
) -> None:
    """Options for every command; give them before the command: attnprobe --dtype bfloat16 census ..."""
    if dtype not in DTYPES:
        raise AttnprobeError(f"unknown --dtype '{dtype}': choose float32, bfloat16 or float16")
    LOAD_OPTIONS.clear()
    LOAD_OPTIONS.update(dtype=DTYPES[dtype], device=device, device_map=device_map, torch_kernels=torch_kernels)


def _load(spec: str):
    import torch

    from attnprobe.hooks.model import load_model
    from attnprobe.kernels.dispatch import force_torch

    options = dict(LOAD_OPTIONS)
    force_torch(options.pop("torch_kernels", False))
    with console.status(Text(f"loading {spec}")):
        start = time.time()
        model = load_model(spec, **{**options, "dtype": getattr(torch, options.get("dtype", "float32"))})
    console.print(f"loaded {spec} in {time.time() - start:.1f} s", style="dim")
    return model


def note(message: str) -> None:
    console.print(Text.assemble(("note: ", "yellow"), message))


@app.command()
def info(model: str = ModelOption) -> None:
    """Print a model's facts: layers, heads, KV heads, head dim, attention type per layer, BOS, window, hash."""
    from rich.table import Table

    loaded = _load(model)
    table = Table(title=f"ModelInfo: {model}", show_header=False)
    for key, value in loaded.info.to_dict().items():
        if key == "layer_types":
            kinds = sorted(set(value))
            value = ", ".join(f"{k} x{value.count(k)}" for k in kinds) + f"  ({' '.join(v[0] for v in value)})"
        table.add_row(key, str(value))
    console.print(table)


@app.command()
@config_options(CensusConfig)
def census(
    config: CensusConfig,
    model: str = ModelOption,
    backend: str = BackendOption,
    out: Optional[Path] = OutOption("census", "; rerun with the same --out to resume"),
    skip: str = typer.Option("", help="comma-separated census stages to skip: " + ", ".join(declared.stage_names())),
) -> None:
    """Run the head census and write a run directory.

    Writes manifest.json, heads.parquet (one row per head: every score, kv_head, layer_type, roles),
    sink_rate.json, sinks.parquet (hidden-sink events), secondary_sinks.parquet, massive.parquet,
    massive_layers.parquet, massive_intervention.parquet, niah_samples.jsonl and retrieval_heads.json.
    """
    unknown = [name for name in listed(skip) if name not in declared.stage_names()]
    if unknown:
        raise AttnprobeError(f"unknown census stage '{unknown[0]}': choose from {', '.join(declared.stage_names())}")
    out = run_dir(out, "census", model)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attnprobe.hooks.backends import make_backend
    from attnprobe.probe import mechanisms
    from attnprobe.probe.census import Census

    stages = tuple(name for name in declared.stage_names() if name not in listed(skip))
    mechanisms.plan(stages, lambda name: (out / "shards" / f"{name}.done").exists())
    loaded = _load(model)
    start = time.time()
    with Progress(TextColumn("{task.description:<22}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        heads = Census(loaded, make_backend(backend, loaded), config, out, progress, note=note).execute(stages)
    console.print(f"census of {model} finished in {time.time() - start:.0f} s -> {out}{_peak_gpu_memory()}")
    print_summary(out, heads)


def _peak_gpu_memory() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return f" (peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB)"


@app.command()
def figures(
    run_dir: Path = typer.Argument(..., help="a run directory written by census, ablate, swap, budget, convert or ladder"),
    formats: str = typer.Option("png,svg", "--format", help="comma-separated: png, svg, pdf"),
    prompt: Optional[str] = typer.Option(None, help="also draw attention maps of this prompt (runs the run's model)"),
    layer: Optional[int] = typer.Option(None, help="with --prompt: the layer whose heads are drawn (default: the middle layer)"),
    head: Optional[int] = typer.Option(None, help="with --prompt: also draw this head alone"),
    kernel: Optional[str] = typer.Option(None, help="with --prompt and --head: also compare the head with this kernel in its place: "
                                         + ", ".join(KERNELS)),
    log: bool = typer.Option(False, help="with --prompt: logarithmic colour"),
) -> None:
    """Draw every figure the run's tables allow into RUN_DIR/figures/ and write RUN_DIR/report.html.

    The report is one self-contained file (images inlined, no network). Figures whose tables the run
    lacks are skipped and listed. With --prompt, attention maps (a grid of the layer's heads, one head,
    and the head against a kernel replacing it) are drawn first and included in the report."""
    if not run_dir.is_dir():
        raise AttnprobeError(f"run directory not found: {run_dir}")
    from attnprobe.analyses.presentation.attention_maps import attention_figures
    from attnprobe.analyses.presentation.report import load_run, write_report
    from attnprobe.analyses.presentation.style import check_formats
    from attnprobe.probe.rundir import RunDir

    chosen_formats = tuple(listed(formats))
    check_formats(chosen_formats)
    if prompt is not None:
        from attnprobe.hooks.backends import make_backend

        manifest = load_run(run_dir).manifest
        if not manifest or "model_id" not in manifest:
            raise AttnprobeError(f"{run_dir / 'manifest.json'} is missing or unreadable: attention maps need the run's model")
        loaded = _load(manifest["model_id"])
        attention_figures(loaded, make_backend("native", loaded), prompt, layer, head, kernel, run_dir / "figures",
                                  log, chosen_formats)
    load_run(run_dir)  # a folder that holds no run is refused before a lock file is left in it
    skipped: dict[str, list[str]] = {}  # why -> the figures (or unreadable files) it skipped
    with RunDir(run_dir).lock(), console.status("drawing figures"):
        report = write_report(run_dir, chosen_formats, on_skip=lambda what, why: skipped.setdefault(why, []).append(what))
    for why, what in skipped.items():
        console.print(f"skipped {', '.join(what)}: {why}", highlight=False, markup=False)
    drawn = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").exists() else []
    console.print(f"{len(drawn)} figures in {run_dir / 'figures'}; report: {report}")


@app.command()
def ladder(
    runs: Optional[list[Path]] = typer.Argument(None, metavar="RUN", help="convert run directories of one model at "
                                                "different stage-2 budgets"),
    out: Path = typer.Option(..., "--out", "-o", help="directory for ladder.parquet (then: attnprobe figures DIR)"),
) -> None:
    """Gather convert runs of one model (the same rows at 2M, 20M, 200M stage-2 tokens, with and without retrieval
    data) into OUT/ladder.parquet: one row per run and architecture, its recall with 95 % intervals, perplexity
    against the control, and what it trained on. `attnprobe figures OUT` draws recall against training tokens, and
    where the runs hold head-level hybrids (convert --selector), recall against their share of exact KV heads."""
    if out.resolve() in {run.resolve() for run in runs or []}:
        raise AttnprobeError(f"--out {out} is one of the runs: write the ladder into a directory of its own")
    from attnprobe.analyses.presentation.ladder import ladder_table, summary
    from attnprobe.probe.rundir import RunDir, write_parquet

    table = ladder_table(runs or [])
    with RunDir(out).lock():
        write_parquet(out / "ladder.parquet", table)
    console.print(summary(table).to_string(index=False))
    console.print(f"-> {out / 'ladder.parquet'}; draw it: attnprobe figures {out}")


_HELD_UNTIL_EXIT = contextlib.ExitStack()  # run directories locked for the command; main() releases them


def _held_run_dir(out: Optional[Path], kind: str, model: str) -> Path:
    """`run_dir`, then created and locked for the rest of the command, before any model loads (under accelerate
    launch the main process holds it for every process)."""
    from attnprobe.probe.rundir import RunDir

    out = run_dir(out, kind, model)
    if os.environ.get("RANK", "0") == "0":
        _HELD_UNTIL_EXIT.enter_context(RunDir(out).lock())
    return out


def _write_manifest(out: Path, loaded, backend: str, extra: dict, started: float) -> None:
    from attnprobe.probe.rundir import write_json

    write_json(out / "manifest.json", {"model_id": loaded.info.model_id, "weights_sha256": loaded.info.weights_sha256,
                                       "backend": backend, "info": loaded.info.to_dict(),
                                       "wall_time_s": time.time() - started, **extra})


@app.command()
@config_options(AblateConfig)
def ablate(
    config: AblateConfig,
    model: str = ModelOption,
    heads: Optional[str] = HeadsOption,
    layers: Optional[str] = LayersOption,
    from_run: Optional[Path] = FromOption,
    exclude: Optional[str] = typer.Option(None, help="heads random:K never draws (same syntax as --heads)"),
    out: Optional[Path] = OutOption("ablate", ""),
) -> None:
    """Ablate heads and measure recall, or sweep top-K against random-K heads.

    Writes ablation.parquet (task, selection, k, seed, accuracy, n, 95 % Wilson interval), niah.parquet
    (every sample: variant, task, length, depth, correct) and manifest.json."""
    if not config.sweep and not heads and not layers:
        raise AttnprobeError("say which heads: --heads (e.g. 3.1,7.4 or top:10:retrieval_score --from RUN) or --layers, or --sweep 5,10,20")
    if config.sweep:
        if from_run is None:
            raise AttnprobeError("--sweep ranks heads by a census: add --from RUN_DIR")
        from attnprobe.analyses.experiments.selection import heads_table

        n_heads = len(heads_table(from_run))
        if min(config.sweep) < 1 or max(config.sweep) > n_heads:
            raise AttnprobeError(f"--sweep takes head counts between 1 and {n_heads} (the census's heads), got "
                                 f"'{','.join(map(str, config.sweep))}'")
    out = run_dir(out, "ablate", model)
    from attnprobe.analyses.experiments.ablation import run_ablation
    from attnprobe.probe.rundir import RunDir, write_parquet

    loaded = _load(model)
    started = time.time()
    with console.status("sweeping" if config.sweep else "evaluating") as status:
        summary, rows, manifest = run_ablation(loaded, config, out, heads, layers, from_run, exclude,
                                               progress=lambda message: status.update(Text(message)), say=console.print)
    with RunDir(out).lock():
        write_parquet(out / "ablation.parquet", summary)
        write_parquet(out / "niah.parquet", rows)
        _write_manifest(out, loaded, "native", manifest, started)
    from rich.table import Table

    table = Table(title=f"ablation ({config.mode}) -> {out}")
    for column in ("selection", "k", "seed", "accuracy", "n", "ci_low", "ci_high"):
        table.add_column(column)
    for r in summary.itertuples():
        table.add_row(r.selection, str(r.k), str(r.seed), f"{r.accuracy:.2f}", str(r.n), f"{r.ci_low:.2f}", f"{r.ci_high:.2f}")
    console.print(table)


@app.command()
@config_options(MatrixSizes)
def swap(
    config: MatrixSizes,
    given: set,
    model: str = ModelOption,
    kernel: Optional[str] = KernelOption,
    heads: Optional[str] = HeadsOption,
    layers: Optional[str] = LayersOption,
    from_run: Optional[Path] = FromOption,
    matrix: bool = typer.Option(False, "--matrix", help="evaluate the named architectures and write the mechanism-loss matrix"),
    variants: Optional[str] = typer.Option(None, help="with --matrix: comma-separated names (default: all): " + ", ".join(VARIANT_NAMES)),
    list_variants: bool = typer.Option(False, "--list-variants", help="print the named architectures of --model and exit"),
    quick: bool = typer.Option(False, help="tiny evaluation sizes (a smoke run); sizes given explicitly are kept"),
    gpu_sizes: bool = typer.Option(False, "--gpu-sizes", help="GPU evaluation sizes (>= 100 samples per task and row, passkey and NIAH to 4K, efficiency at 2K/8K/32K); sizes given explicitly are kept"),
    out: Optional[Path] = OutOption("swap"),
) -> None:
    """Replace heads in place with linear, hybrid or sparse kernels and measure what is lost.

    One swap (--kernel with --heads/--layers) or the whole matrix (--matrix). Writes matrix.parquet and
    matrix.md (rows: architectures; columns: sinks, massive activations, retrieval and induction heads
    present, passkey / key-value / copy accuracy, perplexity, KV or state bytes per token),
    recall.parquet (every sample), fits/ (fitted kernels as safetensors + manifest) and census/ per
    architecture."""
    sizes = with_preset(config, given, MatrixSizes.quick if quick else MatrixSizes.gpu if gpu_sizes else None)
    if list_variants:
        for variant in _catalogue(model).values():
            console.print(f"{variant.name:<24} {variant.description}")
        return
    if matrix:
        requested(variants)
    elif kernel is None:
        raise AttnprobeError("say what to swap: --kernel NAME with --heads/--layers, or --matrix")
    else:
        check_kernel(kernel)
    from attnprobe.analyses.experiments.selection import heads_table

    census_heads = heads_table(from_run) if from_run is not None else None
    out = run_dir(out, "swap", model)
    from attnprobe.analyses.experiments.architectures import run_matrix
    from attnprobe.analyses.experiments.variants import catalogue, resolve
    from attnprobe.hooks.backends import make_backend

    loaded = _load(model)
    if matrix:
        chosen = resolve(loaded, variants or ",".join(catalogue(loaded)), None, None, None, from_run, "swap")
        skipped = [v.name for v in chosen if v.name.startswith("keep-")] if census_heads is None else []
        if skipped:
            note(f"skipping {', '.join(skipped)}: they need --from a census run")
        chosen = [v for v in chosen if v.name not in skipped]
    else:
        chosen = [catalogue(loaded)["original"], *resolve(loaded, None, kernel, heads, layers, from_run, "swap")]
    started = time.time()

    def report(row):
        console.print(f"{row['architecture']}: passkey {row['passkey_acc']:.2f}, kv {row['kv_recall_acc']:.2f}, "
                      f"copy {row['copy_acc']:.2f}, niah {row['niah_acc']:.2f}, ppl {row['perplexity']:.2f}")

    with console.status("evaluating") as status:
        table, _ = run_matrix(loaded, make_backend("native", loaded), chosen, census_heads, out, sizes,
                              command="matrix" if matrix else "swap", progress=lambda m: status.update(Text(m)), on_row=report)
    texts = out / "texts.json"
    _write_manifest(out, loaded, "native", {"command": "swap", "variants": [v.name for v in chosen], "sizes": dataclasses.asdict(sizes),
                                            "texts": _read_json(texts) if texts.exists() else []}, started)
    console.print(table.drop(columns=["description"]).to_string(index=False))
    console.print(f"-> {out / 'matrix.md'}")


def _catalogue(model: str) -> dict:
    from attnprobe.analyses.experiments.variants import catalogue

    return catalogue(_load(model))


def _read_json(path: Path):
    from attnprobe.probe.rundir import read_json

    return read_json(path)


@app.command()
@config_options(BudgetSizes)
def budget(
    config: BudgetSizes,
    given: set,
    model: str = ModelOption,
    from_run: Optional[Path] = FromOption,
    quick: bool = typer.Option(False, help="CPU sizes: short prompts, one sample per cell, 2 DuoAttention steps; sizes given explicitly are kept"),
    time_limit: Optional[float] = typer.Option(None, help="start no new cell after this many seconds (rerun to resume)"),
    out: Optional[Path] = OutOption("budget"),
) -> None:
    """Which heads must stay exact: each selector keeps a budget of heads exact and the rest become
    streaming (or another kernel); plus sparse-attention rows.

    Writes rankings.parquet, budget.parquet (kind, selector, seed, budget, task, accuracy with a 95 %
    Wilson interval, perplexity, KV bytes), budget_samples.parquet, overlap.parquet (Jaccard of the
    selectors' head sets), needle_keep.parquet (share of the needle each sparse rule keeps per head),
    manifest.json and cells/ (one per finished cell, so a rerun resumes)."""
    sizes = with_preset(config, given, BudgetSizes.quick if quick else None)
    if "retrieval" in sizes.selectors:  # the census table is read, or named in one line, before anything else
        from attnprobe.analyses.experiments.selection import heads_table

        if from_run is None:
            raise AttnprobeError("the retrieval selector ranks heads by a census: add --from RUN_DIR (or drop it from --selectors)")
        heads_table(from_run)
    out = _held_run_dir(out, "budget", model)
    from attnprobe.analyses.experiments.budget import run_sweep, winners
    from attnprobe.hooks.backends import make_backend

    loaded = _load(model)
    started = time.time()
    with console.status("budget sweep") as status:
        def progress(message):  # a log (not a terminal) gets one timed line per step
            status.update(Text(f"budget: {message}"))
            if not console.is_terminal:
                console.print(f"[{time.time() - started:7.1f} s] {message}")

        tables = run_sweep(loaded, make_backend("native", loaded), out, sizes, from_run, time_limit, progress)
    for message in _read_json(out / "manifest.json")["notes"]:
        note(message)
    budget_table = tables["budget"]
    if not budget_table.empty:
        shown = budget_table[budget_table["task"] == "passkey"][["kind", "selector", "seed", "budget", "exact_heads", "accuracy",
                                                                 "ci_low", "ci_high", "perplexity", "kv_bytes_per_token"]]
        console.print(shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        console.print("best selector per budget (passkey):\n" + winners(budget_table).to_string(index=False))
    console.print(f"-> {out}")


@app.command()
@config_options(ConvertConfig)
def convert(
    config: ConvertConfig,
    model: str = ModelOption,
    kernel: Optional[str] = KernelOption,
    heads: Optional[str] = HeadsOption,
    layers: Optional[str] = LayersOption,
    from_run: Optional[Path] = FromOption,
    variants: Optional[str] = VariantsOption,
    control: bool = typer.Option(True, help="also put the unmodified model through stage 2 (the 'control' row the gate compares with)"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="training text: files or folders of .txt/.md, .jsonl or .parquet with a 'text' field (repeatable)"),
    dataset: Optional[str] = typer.Option(None, help="a Hugging Face dataset NAME[:CONFIG] (needs a network)"),
    epochs: int = typer.Option(1, help="passes over the training data the budget may take"),
    sample_batch: int = typer.Option(32, help="self-samples per generate call and cached shard (a GPU takes hundreds)"),
    recompute_layers: bool = typer.Option(False, help="stage 2 keeps only each decoder layer's inputs and recomputes the rest "
                                          "in the backward pass (about one layer of activations, one more forward; same result)"),
    loss: str = typer.Option("chunked", help="stage 2's KL: chunked (from hidden states, no full logits) | liger (CUDA) | logits (the old path)"),
    selector: Optional[str] = typer.Option(None, help="head-level hybrid: rank KV heads by retrieval, teacher-forced, ablation, "
                                           "duo, kl-layers, uniform-layers, random or razor; keep --kv-budget softmax, the rest --family"),
    kv_budget: str = typer.Option("12.5%", help="with --selector: KV heads kept softmax, a share (2%, 6.25%, 0.125) or a count"),
    family: str = typer.Option("gated-deltanet", help="with --selector: gated-deltanet | kda | sink+window+gdn"),
    retrieval_fraction: float = typer.Option(0.0, help="share of training windows that are synthetic retrieval documents (0-1)"),
    retrieval_stages: str = typer.Option("2", help="stages that get them: 1, 2 or both"),
    part: Optional[str] = typer.Option(None, help="run only these parts, each resumable in --out: data, convert, finish, "
                                       "evaluate, census (comma-separated; e.g. convert on a GPU, evaluate anywhere)"),
    evaluate: bool = typer.Option(True, help="evaluate every row through the matrix (recall, perplexity, gate)"),
    census: bool = typer.Option(False, help="with --evaluate: also a small census of each converted model"),
    quick: bool = typer.Option(False, help="tiny evaluation sizes (a smoke run)"),
    gpu_sizes: bool = typer.Option(False, "--gpu-sizes", help="GPU evaluation sizes (>= 100 samples per task and row, passkey "
                                   "and NIAH to 4K, efficiency at 2K/8K/32K)"),
    tasks: Optional[str] = typer.Option(None, help="recall tasks of every row, comma-separated (default: passkey, kv_recall, copying, niah)"),
    out: Optional[Path] = OutOption("convert"),
) -> None:
    """Two-stage conversion (attention transfer, then end-to-end KL with LoRA) of heads or named architectures,
    with the fine-tuned softmax control, then the gated matrix.

    Writes conversions/NAME/ (fit/, adapters.safetensors, conversion.json, checkpoints), matrix.parquet and
    matrix.md (with ppl_vs_original, ppl_vs_control and gate), recall.parquet and manifest.json. Data-parallel:
    accelerate launch --num_processes N -m attnprobe.analyses.cli convert ..."""
    requested(variants)
    if kernel is not None or heads or layers:
        check_kernel(kernel)
    config.check(int(os.environ.get("WORLD_SIZE", "1")))  # accelerate launch sets it: the batch must split evenly
    if epochs < 1 or sample_batch < 1:
        raise AttnprobeError(f"--epochs and --sample-batch must be whole numbers of at least 1, got {epochs} and {sample_batch}")
    from attnprobe.analyses.conversion import command
    from attnprobe.analyses.conversion.head_hybrid import HeadHybrid
    from attnprobe.analyses.conversion.retrieval_data import RetrievalMix
    from attnprobe.analyses.conversion.stage2 import FastPath

    FastPath(loss=loss).check(config.ce_weight)
    sizes = evaluation_sizes(quick, gpu_sizes, tasks)
    hybrid = HeadHybrid(selector=selector, kv_budget=kv_budget, family=family) if selector else None
    retrieval = RetrievalMix(fraction=retrieval_fraction, stages=retrieval_stages) if retrieval_fraction else None
    out = _held_run_dir(out, "convert", model)
    loaded = _load(model)
    started = time.time()
    table = command.run(loaded, out, config, variants=variants, kernel=kernel, heads=heads, layers=layers, from_run=from_run,
                        control=control, data=data or [], dataset=dataset, epochs=epochs, sample_batch=sample_batch, evaluate=evaluate, census=census,
                        quick=quick, console=console, recompute_layers=recompute_layers, hybrid=hybrid, retrieval=retrieval,
                        parts=part, loss=loss, sizes=sizes)
    if table is not None:
        _write_manifest(out, loaded, "native", {"command": "convert", "rows": list(table["architecture"])}, started)
        console.print(table.drop(columns=["description", "conversion"], errors="ignore").to_string(index=False))
        console.print(f"-> {out / 'matrix.md'}")


def evaluation_sizes(quick: bool, gpu_sizes: bool, tasks: Optional[str]):
    """The convert command's evaluation sizes, checked before any model loads: a function of the size overrides."""
    import functools

    if quick and gpu_sizes:
        raise AttnprobeError("--quick and --gpu-sizes contradict each other: pick one")
    given = {"tasks": tuple(t.strip() for t in tasks.split(",") if t.strip())} if tasks is not None else {}
    preset = MatrixSizes.quick if quick else MatrixSizes.gpu if gpu_sizes else MatrixSizes
    preset(**given)  # an unknown task or an empty list fails here, in one line
    return functools.partial(preset, **given)


def print_summary(out: Path, heads) -> None:
    """One line per registered mechanism, judged by the run's own thresholds (its manifest's config)."""
    from attnprobe.probe import mechanisms

    manifest = out / "manifest.json"
    thresholds = _read_json(manifest).get("config", {}).get("thresholds") if manifest.exists() else None
    thresholds = {**mechanisms.default_thresholds(), **(thresholds or {})}
    for mechanism in mechanisms.mechanisms():
        line = mechanism.summarise(out, heads, thresholds)
        if line is not None:
            console.print(Text.assemble((mechanism.label, "bold"), " ", line))


INTERRUPTED = "interrupted: rerun to resume"
OUT_OF_MEMORY = ("out of memory{size}: what finished is kept in --out; rerun with less at once (convert: --recompute-layers "
                 "or a larger --accumulation with the same --batch, both resume; other commands: shorter --lengths or fewer "
                 "samples, in a new --out)")


def out_of_memory(error: BaseException) -> str | None:
    """The one-line message for a failed allocation (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    import re

    torch = sys.modules.get("torch")  # no torch imported: nothing ran that could run out of memory there
    text = str(error)
    if not (torch is not None and isinstance(error, torch.OutOfMemoryError)) and "can't allocate memory" not in text:
        return None
    asked = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", text, re.IGNORECASE)
    if asked is None:
        return OUT_OF_MEMORY.format(size="")
    number, unit = asked.groups()
    size = f"{float(number) / 2 ** 30:.2f} GiB" if unit == "bytes" else f"{number} {unit}"
    return OUT_OF_MEMORY.format(size=f" (one allocation of {size})")


def fail(message: str, code: int = 2) -> None:
    """Print `message` literally as one error line and exit with `code`."""
    errors.print(Text.assemble(("error:", "red"), " ", message))
    sys.exit(code)


def main() -> None:
    """Run the app: a user's error is one line and exit 2, Ctrl-C exit 130, usage errors click's own code."""
    try:
        with _HELD_UNTIL_EXIT:
            code = app(standalone_mode=False)  # typer turns Ctrl-C into exit code 130 here
    except AttnprobeError as error:
        fail(str(error))
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        message = out_of_memory(error)
        if message is None:
            raise
        fail(message)
    except typer.TyperException as error:  # usage errors (bad option values): one line too, click's exit code
        if not hasattr(error, "format_message"):
            raise
        if error.format_message():  # empty when the help was asked for by giving no command
            fail(f"{error.format_message()} (see --help)", getattr(error, "exit_code", 2))
        sys.exit(getattr(error, "exit_code", 2))
    if code == 130:
        errors.print(INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
