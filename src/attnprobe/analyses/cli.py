"""The `attnprobe` command line. User errors print one line and exit 2; no tracebacks."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import sys
import time
import typing
from datetime import datetime
from pathlib import Path
from typing import Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from attnprobe.errors import AttnprobeError
from attnprobe.probe import mechanisms
from attnprobe.analyses.experiments.architectures import MatrixSizes
from attnprobe.probe.census import CensusConfig
from attnprobe.probe.rundir import RunDir, read_json

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="attnprobe: find attention mechanisms (retrieval heads, sinks, massive activations, induction "
                       "heads) in a softmax model, ablate or replace heads with linear/hybrid kernels, and measure what is lost.")
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # an error stays on one line, however narrow the terminal
ModelOption = typer.Option("smollm2-135m", "--model", "-m",
                           help="smollm2-135m, gemma3-270m, a local HF directory, a .gguf file, or a hub id")
BackendOption = typer.Option("native", "--backend", "-b", help="native | transformer-lens | nnsight")


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
    import torch

    from attnprobe.kernels.dispatch import force_torch

    if dtype not in DTYPES:
        raise AttnprobeError(f"unknown --dtype '{dtype}': choose float32, bfloat16 or float16")
    LOAD_OPTIONS.clear()
    LOAD_OPTIONS.update(dtype=getattr(torch, DTYPES[dtype]), device=device, device_map=device_map)
    force_torch(torch_kernels)


def _load(spec: str):
    from attnprobe.hooks.model import load_model

    with console.status(f"loading {spec}"):
        start = time.time()
        model = load_model(spec, **LOAD_OPTIONS)
    console.print(f"[dim]loaded {spec} in {time.time() - start:.1f} s[/dim]")
    return model


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise AttnprobeError(f"{name} takes comma-separated numbers, got '{text}'")
    return values


def _sequence_option(text: str, name: str, kind: type) -> list:
    values = _floats(text, name)
    if kind is int:
        if any(v != int(v) for v in values):
            raise AttnprobeError(f"{name} takes whole numbers, got '{text}'")
        return [int(v) for v in values]
    return values


def config_options(config_class, exclude: tuple[str, ...] = ()):
    """Decorator: give a command one option per field of the dataclass `config_class` (help from the field's
    metadata, default from the field; lists and tuples as comma-separated text) and, when the class has
    `thresholds`, one --ROLE-threshold per registered role. The command receives the built `config` (and, if
    it takes `given`, the names of the fields set on the command line). A new setting is a new field."""
    hints = typing.get_type_hints(config_class)
    fields = [f for f in dataclasses.fields(config_class) if f.name not in exclude and f.metadata.get("cli", True)]
    sequence = {f.name: typing.get_args(hints[f.name])[0] for f in fields if typing.get_origin(hints[f.name]) in (list, tuple)}
    thresholds = mechanisms.default_thresholds() if "thresholds" in hints else {}

    def option_for(f):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name in sequence:
            return str, ",".join(str(v) for v in default)
        if type(None) in typing.get_args(hints[f.name]):
            return Optional[str], default
        return hints[f.name], default

    def decorate(command):
        own = inspect.signature(command)
        params = [p for p in own.parameters.values() if p.name not in ("config", "given")]
        for f in fields:
            annotation, default = option_for(f)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=typer.Option(default, help=f.metadata.get("help"))))
        for role, default in thresholds.items():
            params.append(inspect.Parameter(f"{role}_threshold", inspect.Parameter.KEYWORD_ONLY, annotation=float,
                                            default=typer.Option(default, help=f"threshold of the {role.replace('_', ' ')} role")))

        params.append(inspect.Parameter("_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(command)
        def wrapper(_context: typer.Context, **kwargs):
            values = {}
            for f in fields:
                value = kwargs.pop(f.name)
                values[f.name] = _sequence_option(value, f"--{f.name.replace('_', '-')}", sequence[f.name]) if f.name in sequence else value
            if thresholds:
                values["thresholds"] = {role: kwargs.pop(f"{role}_threshold") for role in thresholds}
            if "given" in own.parameters:
                kwargs["given"] = {f.name for f in fields if getattr(_context.get_parameter_source(f.name), "name", "") == "COMMANDLINE"}
            return command(config=config_class(**values), **kwargs)

        del wrapper.__wrapped__  # typer reads the signature below, not the command's own
        wrapper.__signature__ = own.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


@app.command()
def info(model: str = ModelOption) -> None:
    """Print a model's facts: layers, heads, KV heads, head dim, attention type per layer, BOS, window, hash."""
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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/census-MODEL-TIME); rerun with the same --out to resume"),
    skip: str = typer.Option("", help="comma-separated census stages to skip: " + ", ".join(s.name for s in mechanisms.stages())),
) -> None:
    """Run the head census and write a run directory.

    Writes manifest.json, heads.parquet (one row per head: every score, kv_head, layer_type, roles),
    sink_rate.json, sinks.parquet (hidden-sink events), secondary_sinks.parquet, massive.parquet,
    massive_layers.parquet, massive_intervention.parquet, niah_samples.jsonl and retrieval_heads.json.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attnprobe.hooks.backends import make_backend
    from attnprobe.probe.census import Census

    skipped = {s for s in skip.split(",") if s}
    for name in skipped:
        mechanisms.stage(name)  # an unknown name is refused before the model loads
    stages = tuple(s.name for s in mechanisms.stages() if s.name not in skipped)
    out = _run_dir(out, "census", model)
    mechanisms.plan(stages, lambda name: (out / "shards" / f"{name}.done").exists())
    loaded = _load(model)
    start = time.time()
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        census_run = Census(loaded, make_backend(backend, loaded), config, out, progress,
                            note=lambda message: console.print(f"[yellow]note:[/yellow] {message}", highlight=False))
        heads = census_run.execute(stages)
    console.print(f"census of {model} finished in {time.time() - start:.0f} s -> {out}{_peak_gpu_memory()}")
    print_summary(out, heads)


def _peak_gpu_memory() -> str:
    import torch

    if not torch.cuda.is_available():
        return ""
    return f" (peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB)"


@app.command()
def figures(
    run_dir: Path = typer.Argument(..., help="a run directory written by census, ablate or swap"),
    formats: str = typer.Option("png,svg", "--format", help="comma-separated: png, svg, pdf"),
    prompt: Optional[str] = typer.Option(None, help="also draw attention maps of this prompt (runs the run's model)"),
    layer: Optional[int] = typer.Option(None, help="with --prompt: the layer whose heads are drawn (default: the middle layer)"),
    head: Optional[int] = typer.Option(None, help="with --prompt: also draw this head alone"),
    kernel: Optional[str] = typer.Option(None, help="with --prompt and --head: also compare the head with this kernel in its place"),
    log: bool = typer.Option(False, help="with --prompt: logarithmic colour"),
) -> None:
    """Draw every figure the run's tables allow into RUN_DIR/figures/ and write RUN_DIR/report.html.

    The report is one self-contained file (images inlined, no network). Figures whose tables the run
    lacks are skipped and listed. With --prompt, attention maps (a grid of the layer's heads, one head,
    and the head against a kernel replacing it) are drawn first and included in the report."""
    from attnprobe.analyses.presentation import figures as drawing
    from attnprobe.analyses.presentation.report import load_run, write_report
    from attnprobe.analyses.presentation.style import check_formats

    if not run_dir.is_dir():
        raise AttnprobeError(f"run directory not found: {run_dir}")
    chosen_formats = tuple(f.strip() for f in formats.split(",") if f.strip())
    check_formats(chosen_formats)
    if prompt is not None:
        from attnprobe.hooks.backends import make_backend

        manifest = load_run(run_dir).manifest
        if not manifest or "model_id" not in manifest:
            raise AttnprobeError(f"{run_dir / 'manifest.json'} is missing or unreadable: attention maps need the run's model")
        loaded = _load(manifest["model_id"])
        drawing.attention_figures(loaded, make_backend("native", loaded), prompt, layer, head, kernel, run_dir / "figures",
                                  log, chosen_formats)
    load_run(run_dir)  # a folder that holds no run is refused before a lock file is left in it
    skipped: dict[str, list[str]] = {}  # why -> the figures (or unreadable files) it skipped
    with RunDir(run_dir).lock(), console.status("drawing figures"):
        report = write_report(run_dir, chosen_formats, on_skip=lambda what, why: skipped.setdefault(why, []).append(what))
    for why, what in skipped.items():
        console.print(f"skipped {', '.join(what)}: {why}", highlight=False, markup=False)
    drawn = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").exists() else []
    console.print(f"{len(drawn)} figures in {run_dir / 'figures'}; report: {report}")


HeadsOption = typer.Option(None, "--heads", help="3.1,7.4 | top:K:SCORE (needs --from) | random:K | all")
LayersOption = typer.Option(None, "--layers", help="every head of these layers: 0-29, 3,5,7 or 0-29:every4")
FromOption = typer.Option(None, "--from", help="census run directory whose heads.parquet ranks heads")


def _run_dir(out: Optional[Path], kind: str, model: str) -> Path:
    """The run directory (a new one per run by default), refused now if it can never be written."""
    out = out or Path("runs") / f"{kind}-{Path(model).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise AttnprobeError(f"--out {out} is a file, not a directory: choose a directory")
    existing = next(parent for parent in (out, *out.parents) if parent.exists())
    if not existing.is_dir():
        raise AttnprobeError(f"--out {out} lies inside the file {existing}: choose a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AttnprobeError(f"--out {out} cannot be written ({existing} is not writable): choose another directory")
    return out


_HELD_UNTIL_EXIT = contextlib.ExitStack()  # run directories locked for the command; main() releases them


def _held_run_dir(out: Optional[Path], kind: str, model: str) -> Path:
    """`_run_dir`, then created and locked for the rest of the command, before any model loads (under accelerate
    launch the main process holds it for every process)."""
    out = _run_dir(out, kind, model)
    if os.environ.get("RANK", "0") == "0":
        _HELD_UNTIL_EXIT.enter_context(RunDir(out).lock())
    return out


def _write_manifest(out: Path, loaded, backend: str, extra: dict, started: float) -> None:
    from attnprobe.probe.rundir import write_json

    write_json(out / "manifest.json", {"model_id": loaded.info.model_id, "weights_sha256": loaded.info.weights_sha256,
                                       "backend": backend, "info": loaded.info.to_dict(),
                                       "wall_time_s": time.time() - started, **extra})


@app.command()
def ablate(
    model: str = ModelOption,
    heads: Optional[str] = HeadsOption,
    layers: Optional[str] = LayersOption,
    from_run: Optional[Path] = FromOption,
    exclude: Optional[str] = typer.Option(None, help="heads random:K never draws (same syntax as --heads)"),
    seed: int = typer.Option(0, help="seed for random:K"),
    mode: str = typer.Option("uniform", help="zero | mean | uniform (query zeroed, the retrieval-head paper's masking) | calibrate (ACT, beta 0.4)"),
    sweep: Optional[str] = typer.Option(None, help="K values, e.g. 5,10,20: mask top-K by --score against random-K (needs --from)"),
    seeds: int = typer.Option(10, help="random draws per K in a sweep"),
    exclude_top: Optional[int] = typer.Option(None, help="sweep: random heads come from outside the top N by --score (default 10 % of heads)"),
    score: str = typer.Option("retrieval_score", help="heads.parquet column that ranks heads in a sweep"),
    lengths: str = typer.Option("512,1024", help="NIAH / passkey context lengths"),
    depths: str = typer.Option("0,0.5,1", help="needle depths (0-1)"),
    task: str = typer.Option("niah", help="niah | passkey"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/ablate-MODEL-TIME)"),
) -> None:
    """Ablate heads and measure recall, or sweep top-K against random-K heads.

    Writes ablation.parquet (task, selection, k, seed, accuracy, n, 95 % Wilson interval), niah.parquet
    (every sample: variant, task, length, depth, correct) and manifest.json."""
    from attnprobe.analyses import recall
    from attnprobe.analyses.experiments.ablation import MODES, SweepCells, ablation_edits, evaluate, heldout_niah, masking_sweep, wilson_summary
    from attnprobe.probe import texts as texts_module
    from attnprobe.probe.census import resolve_bos
    from attnprobe.analyses.experiments.selection import parse_heads
    from attnprobe.hooks.backends import make_backend
    from attnprobe.probe.rundir import write_parquet

    if mode not in MODES:
        raise AttnprobeError(f"unknown ablation mode '{mode}': choose one of {', '.join(MODES)}")
    if task not in ("niah", "passkey"):
        raise AttnprobeError(f"unknown task '{task}': choose niah or passkey")
    if sweep is None and not heads and not layers:
        raise AttnprobeError("say which heads: --heads (e.g. 3.1,7.4 or top:10:retrieval_score --from RUN) or --layers, or --sweep 5,10,20")
    length_list, depth_list = _sequence_option(lengths, "--lengths", int), _sequence_option(depths, "--depths", float)
    if not length_list or min(length_list) < 16:
        raise AttnprobeError(f"--lengths are context lengths, whole numbers of at least 16 tokens; got '{lengths}'")
    if not depth_list or any(not 0 <= d <= 1 for d in depth_list):
        raise AttnprobeError(f"--depths are fractions between 0 and 1; got '{depths}'")
    if seeds < 1:
        raise AttnprobeError(f"--seeds must be at least 1, got {seeds}")
    ks = _sequence_option(sweep, "--sweep", int) if sweep is not None else []
    if sweep is not None:
        if from_run is None:
            raise AttnprobeError("--sweep ranks heads by a census: add --from RUN_DIR")
        n_heads = len(_heads_table(from_run))
        if not ks or min(ks) < 1 or max(ks) > n_heads:
            raise AttnprobeError(f"--sweep takes head counts between 1 and {n_heads} (the census's heads), got '{sweep}'")
    out = _run_dir(out, "ablate", model)

    loaded = _load(model)
    window = loaded.info.max_context
    if window and max(length_list) + 64 > window:  # a prompt is the haystack plus its question and template
        raise AttnprobeError(f"--lengths {max(length_list)} does not fit the model's window of {window} tokens "
                             f"(keep lengths <= {window - 64})")
    bos = resolve_bos("auto", loaded)
    niah_task = heldout_niah(from_run, length_list, depth_list, bos) if sweep is not None and task == "niah" else None

    def run_task(m, label):
        if niah_task is not None:  # needles and haystack the census did not rank heads with
            return niah_task(m, label)
        if task == "niah":
            return recall.niah(m, length_list, depth_list, variant=label, bos=bos)
        return recall.passkey(m, length_list, depth_list, samples=2, variant=label, bos=bos)

    backend_impl = make_backend("native", loaded)
    started = time.time()
    recorder = texts_module.recording()
    used_text = recorder.__enter__()  # the text ranges this run reads, for its manifest
    if sweep is not None:  # each finished configuration is kept under OUT/sweep_cells: a rerun resumes
        cells = SweepCells(out / "sweep_cells", {"ks": ks, "draws": seeds, "mode": mode, "score": score, "exclude_top": exclude_top,
                                                 "task": task, "lengths": length_list, "depths": depth_list, "bos": bos,
                                                 "census": str(Path(from_run).resolve()), "weights": loaded.info.weights_sha256})
        with console.status("sweeping") as status:
            summary, rows = masking_sweep(loaded, backend_impl, from_run, ks, seeds, run_task, mode, score, exclude_top, bos,
                                          progress=lambda message: status.update(f"sweep: {message}"), cells=cells)
        used_text.extend(cells.texts())  # the ranges the resumed cells read in an earlier run
        chosen_label = f"sweep {ks} by {score}"
    else:
        chosen = parse_heads(heads, loaded.info, from_run, seed, exclude, layers)
        console.print(f"ablating {len(chosen)} heads ({mode}): " + ", ".join(f"{l}.{h}" for l, h in chosen[:20]) + (" ..." if len(chosen) > 20 else ""))
        with console.status("evaluating"):
            original = evaluate(loaded, backend_impl, [], run_task, "original").assign(selection="none", k=0, seed=-1)
            ablated = evaluate(loaded, backend_impl, ablation_edits(loaded, backend_impl, chosen, mode, bos=bos), run_task,
                               "ablated").assign(selection="chosen", k=len(chosen), seed=seed)
        rows = pd.concat([original, ablated], ignore_index=True)
        summary = wilson_summary(rows)
        chosen_label = ",".join(f"{l}.{h}" for l, h in chosen)
    recorder.__exit__(None, None, None)
    with RunDir(out).lock():
        write_parquet(out / "ablation.parquet", summary)
        write_parquet(out / "niah.parquet", rows.drop(columns=[c for c in ("response",) if c in rows]))
        _write_manifest(out, loaded, "native", {"command": "ablate", "mode": mode, "heads": chosen_label, "task": task,
                                                "lengths": length_list, "depths": depth_list, "bos": bos,
                                                "texts": texts_module.summarise(used_text)}, started)
    table = Table(title=f"ablation ({mode}) -> {out}")
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
    kernel: Optional[str] = typer.Option(None, help="softmax | elu | relu | taylor | performer | hedgehog | window+linear | sink+window | sink+window+linear"),
    heads: Optional[str] = HeadsOption,
    layers: Optional[str] = LayersOption,
    from_run: Optional[Path] = FromOption,
    matrix: bool = typer.Option(False, "--matrix", help="evaluate the named architectures and write the mechanism-loss matrix"),
    variants: Optional[str] = typer.Option(None, help="with --matrix: comma-separated names (default: all; --list-variants shows them)"),
    list_variants: bool = typer.Option(False, "--list-variants", help="print the named architectures and exit"),
    quick: bool = typer.Option(False, help="tiny evaluation sizes (a smoke run); sizes given explicitly are kept"),
    gpu_sizes: bool = typer.Option(False, "--gpu-sizes", help="GPU evaluation sizes (>= 30 samples per task and row, passkey and NIAH to 4K, efficiency at 2K/8K/32K); sizes given explicitly are kept"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/swap-MODEL-TIME); rerun to resume"),
) -> None:
    """Replace heads in place with linear or hybrid kernels and measure what is lost.

    One swap (--kernel with --heads/--layers) or the whole matrix (--matrix). Writes matrix.parquet and
    matrix.md (rows: architectures; columns: sinks, massive activations, retrieval and induction heads
    present, passkey / key-value / copy accuracy, perplexity, KV or state bytes per token),
    recall.parquet (every sample), fits/ (fitted kernels as safetensors + manifest) and census/ per
    architecture."""
    from attnprobe.analyses.experiments.architectures import Variant, catalogue, run_matrix
    from attnprobe.analyses.experiments.selection import parse_heads
    from attnprobe.hooks.backends import make_backend
    from attnprobe.kernels.registry import KERNELS

    preset = MatrixSizes.quick if quick else MatrixSizes.gpu if gpu_sizes else None
    sizes = preset(**{name: getattr(config, name) for name in given}) if preset else config
    if not matrix and not list_variants:
        if kernel is None:
            raise AttnprobeError("say what to swap: --kernel NAME with --heads/--layers, or --matrix")
        if kernel not in KERNELS:
            raise AttnprobeError(f"unknown kernel '{kernel}': choose one of {', '.join(KERNELS)}")
    heads_table = _heads_table(from_run) if from_run is not None else None
    out = _run_dir(out, "swap", model) if not list_variants else out
    loaded = _load(model)
    names = catalogue(loaded)
    if list_variants:
        for variant in names.values():
            console.print(f"{variant.name:<24} {variant.description}")
        return
    if matrix:
        wanted = [v.strip() for v in variants.split(",") if v.strip()] if variants else list(names)
        unknown = [v for v in wanted if v not in names]
        if unknown or not wanted:
            raise AttnprobeError(f"unknown variant(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(names)}")
        if heads_table is None:
            skipped = [v for v in wanted if v.startswith("keep-")]
            if skipped:
                console.print(f"[yellow]skipping {', '.join(skipped)}: they need --from a census run[/yellow]")
            wanted = [v for v in wanted if v not in skipped]
        chosen_variants = [names[v] for v in wanted]
    else:
        replaced = set(parse_heads(heads, loaded.info, from_run, 0, None, layers or (None if heads else f"0-{loaded.info.n_layers - 1}")))
        everyone = {(l, h) for l in range(loaded.info.n_layers) for h in range(loaded.info.n_heads)}
        keep = everyone - replaced
        chosen_variants = [names["original"], Variant(f"swap-{kernel}", kernel, lambda m, t: keep, f"{len(replaced)} heads {kernel}")]
    started = time.time()

    def report(row):
        console.print(f"{row['architecture']}: passkey {row['passkey_acc']:.2f}, kv {row['kv_recall_acc']:.2f}, "
                      f"copy {row['copy_acc']:.2f}, niah {row['niah_acc']:.2f}, ppl {row['perplexity']:.2f}")

    with console.status("evaluating") as status:
        table, _ = run_matrix(loaded, make_backend("native", loaded), chosen_variants, heads_table, out, sizes,
                              command="matrix" if matrix else "swap", progress=status.update, on_row=report)
    _write_manifest(out, loaded, "native", {"command": "swap", "variants": [v.name for v in chosen_variants],
                                            "sizes": dataclasses.asdict(sizes),
                                            "texts": read_json(out / "texts.json") if (out / "texts.json").exists() else []},
                    started)
    console.print(table.drop(columns=["description"]).to_string(index=False))
    console.print(f"-> {out / 'matrix.md'}")


@app.command()
def budget(
    model: str = ModelOption,
    from_run: Optional[Path] = FromOption,
    selectors: str = typer.Option("retrieval,razor,duo,fit,random", help="retrieval (needs --from), razor, duo, fit, random"),
    budgets: str = typer.Option("0.0625,0.125,0.25,0.5,0.75", help="shares of units kept exact"),
    kinds: str = typer.Option("sink+window:sinks=4,window=64;sink+window:sinks=64,window=256",
                              help="';'-separated replacements of the other heads: KERNEL[:option=value,...] (hedgehog is fitted)"),
    sparse: Optional[str] = typer.Option(None, help="';'-separated sparse rows, every head replaced (default: oracle-topk, quest, vertical-slash, power)"),
    unit: str = typer.Option("kv", help="kv: rank KV heads (a KV head's cache is kept whole) | head: rank query heads"),
    seeds: Optional[int] = typer.Option(None, help="random draws (default 3; --quick 2)"),
    tasks: str = typer.Option("passkey,niah", help="recall tasks of every cell: passkey, niah"),
    lengths: Optional[str] = typer.Option(None, help="passkey and NIAH lengths in tokens (default 1024,2048,4096; --quick 128)"),
    chunk: Optional[int] = typer.Option(None, help="query chunk of the replaced heads' prefill (default 64; 512 is faster on a GPU)"),
    quick: bool = typer.Option(False, help="CPU sizes: short prompts, one sample per cell, 2 DuoAttention steps"),
    time_limit: Optional[float] = typer.Option(None, help="start no new cell after this many seconds (rerun to resume)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/budget-MODEL-TIME); rerun to resume"),
) -> None:
    """Which heads must stay exact: each selector keeps a budget of heads exact and the rest become
    streaming (or another kernel); plus sparse-attention rows.

    Writes rankings.parquet, budget.parquet (kind, selector, seed, budget, task, accuracy with a 95 %
    Wilson interval, perplexity, KV bytes), budget_samples.parquet, overlap.parquet (Jaccard of the
    selectors' head sets), needle_keep.parquet (share of the needle each sparse rule keeps per head),
    manifest.json and cells/ (one per finished cell, so a rerun resumes)."""
    from attnprobe.analyses.experiments.budget import BudgetSizes, run_sweep, winners
    from attnprobe.hooks.backends import make_backend
    from attnprobe.probe.rundir import read_json

    def listed(text):  # options hold commas, so specs are separated by ';'
        return tuple(x.strip() for x in text.split(";") if x.strip())

    chosen = dict(selectors=tuple(s.strip() for s in selectors.split(",") if s.strip()), budgets=tuple(_floats(budgets, "--budgets")),
                  kinds=listed(kinds), unit=unit, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                  **{k: v for k, v in (("seeds", seeds), ("chunk", chunk)) if v is not None})
    sizes = BudgetSizes.quick(**chosen) if quick else BudgetSizes(**chosen)
    if sparse is not None:
        sizes.sparse = listed(sparse)
    if lengths:
        sizes.passkey_lengths = sizes.niah_lengths = tuple(int(x) for x in _floats(lengths, "--lengths"))
    sizes.check()  # fields set above are checked too, and the census read, before any directory or model
    if "retrieval" in sizes.selectors:
        _heads_table(from_run)
    out = _held_run_dir(out, "budget", model)
    loaded = _load(model)
    started = time.time()
    with console.status("budget sweep") as status:
        def progress(message):  # a log (not a terminal) gets one timed line per step
            status.update(f"budget: {message}")
            if not console.is_terminal:
                console.print(f"[{time.time() - started:7.1f} s] {message}", highlight=False)

        tables = run_sweep(loaded, make_backend("native", loaded), out, sizes, from_run, time_limit, progress)
    for note in read_json(out / "manifest.json")["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    budget_table = tables["budget"]
    if not budget_table.empty:
        shown = budget_table[budget_table["task"] == "passkey"][["kind", "selector", "seed", "budget", "exact_heads", "accuracy",
                                                                 "ci_low", "ci_high", "perplexity", "kv_bytes_per_token"]]
        console.print(shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        console.print("best selector per budget (passkey):\n" + winners(budget_table).to_string(index=False))
    console.print(f"-> {out}")


def _heads_table(from_run: Optional[Path]) -> pd.DataFrame:
    from attnprobe.probe.rundir import census_heads

    return census_heads(from_run)


@app.command()
def convert(
    model: str = ModelOption,
    kernel: Optional[str] = typer.Option(None, help="kernel for --heads/--layers (any name of the kernel registry)"),
    heads: Optional[str] = HeadsOption,
    layers: Optional[str] = LayersOption,
    from_run: Optional[Path] = FromOption,
    variants: Optional[str] = typer.Option(None, help="named architectures to convert (swap --list-variants), e.g. all-hedgehog,layers-1of2-softmax"),
    control: bool = typer.Option(True, help="also put the unmodified model through stage 2 (the 'control' row the gate compares with)"),
    tokens: str = typer.Option("1M", help="stage-2 (end-to-end) token budget, e.g. 20M"),
    transfer_tokens: str = typer.Option("1M", help="stage-1 (attention transfer) token budget"),
    length: int = typer.Option(1024, help="tokens per training sequence"),
    batch: int = typer.Option(8, help="sequences per optimizer step (all processes and accumulation steps together)"),
    accumulation: int = typer.Option(1, help="gradient accumulation steps per optimizer step"),
    lr: float = typer.Option(1e-3, help="stage-2 peak learning rate (warmup, then cosine)"),
    transfer_lr: float = typer.Option(1e-2, help="stage-1 peak learning rate"),
    train: str = typer.Option("lora", help="what stage 2 trains beside the kernels: lora (peft, q/k/v/o) | kernels | attention"),
    lora_rank: int = typer.Option(8),
    ce_weight: float = typer.Option(0.0, help="weight of the next-token loss added to the KL"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="training text: files or folders of .txt/.md, .jsonl or .parquet with a 'text' field (repeatable)"),
    dataset: Optional[str] = typer.Option(None, help="a Hugging Face dataset NAME[:CONFIG] (needs a network)"),
    epochs: int = typer.Option(1, help="passes over the training data the budget may take"),
    seed: int = typer.Option(0),
    checkpoint_every: int = typer.Option(50, help="optimizer steps between checkpoints"),
    recompute_layers: bool = typer.Option(False, help="stage 2 keeps only each decoder layer's inputs and recomputes the rest "
                                          "in the backward pass (about one layer of activations, one more forward; same result)"),
    evaluate: bool = typer.Option(True, help="evaluate every row through the matrix (recall, perplexity, gate)"),
    census: bool = typer.Option(False, help="with --evaluate: also a small census of each converted model"),
    quick: bool = typer.Option(False, help="tiny evaluation sizes (a smoke run)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/convert-MODEL-TIME); rerun to resume"),
) -> None:
    """Two-stage conversion (attention transfer, then end-to-end KL with LoRA) of heads or named architectures,
    with the fine-tuned softmax control, then the gated matrix.

    Writes conversions/NAME/ (fit/, adapters.safetensors, conversion.json, checkpoints), matrix.parquet and
    matrix.md (with ppl_vs_original, ppl_vs_control and gate), recall.parquet and manifest.json. Data-parallel:
    accelerate launch --num_processes N -m attnprobe.analyses.cli convert ..."""
    from attnprobe.analyses.conversion import rows as conversion
    conversion.recipe(length=length, batch=batch, accumulation=accumulation, transfer_tokens=transfer_tokens, tokens=tokens,
                      transfer_lr=transfer_lr, lr=lr, train=train, lora_rank=lora_rank, ce_weight=ce_weight,
                      checkpoint_every=checkpoint_every, seed=seed)  # every option checked before the model loads
    if epochs < 1:
        raise AttnprobeError(f"--epochs must be a whole number of at least 1, got {epochs}")
    out = _held_run_dir(out, "convert", model)
    loaded = _load(model)
    started = time.time()
    table = conversion.run(loaded, out, kernel=kernel, heads=heads, layers=layers, from_run=from_run, variants=variants,
                           control=control, tokens=tokens, transfer_tokens=transfer_tokens, length=length, batch=batch,
                           accumulation=accumulation, lr=lr, transfer_lr=transfer_lr, train=train, lora_rank=lora_rank,
                           ce_weight=ce_weight, data=data or [], dataset=dataset, epochs=epochs, seed=seed,
                           checkpoint_every=checkpoint_every, evaluate=evaluate, census=census, quick=quick, console=console,
                           recompute_layers=recompute_layers)
    if table is not None:
        _write_manifest(out, loaded, "native", {"command": "convert", "rows": list(table["architecture"])}, started)
        console.print(table.drop(columns=["description", "conversion"], errors="ignore").to_string(index=False))
        console.print(f"-> {out / 'matrix.md'}")


def print_summary(out: Path, heads) -> None:
    """One line per registered mechanism, judged by the run's own thresholds (its manifest's config)."""
    from attnprobe.probe.rundir import read_json

    manifest = out / "manifest.json"
    thresholds = read_json(manifest).get("config", {}).get("thresholds") if manifest.exists() else None
    thresholds = {**mechanisms.default_thresholds(), **(thresholds or {})}
    for mechanism in mechanisms.mechanisms():
        line = mechanism.summarise(out, heads, thresholds)
        if line is not None:
            console.print(f"[bold]{mechanism.label}[/bold] {line}", highlight=False)


INTERRUPTED = "interrupted: rerun to resume"
OUT_OF_MEMORY = ("out of memory{size}: what finished is kept in --out; rerun with less at once (convert: --recompute-layers "
                 "or a larger --accumulation with the same --batch, both resume; other commands: shorter --lengths or fewer "
                 "samples, in a new --out)")


def out_of_memory(error: BaseException) -> str | None:
    """The one-line message for a failed allocation (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)."""
    import re

    import torch

    text = str(error)
    if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in text:
        return None
    asked = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", text, re.IGNORECASE)
    if asked is None:
        return OUT_OF_MEMORY.format(size="")
    number, unit = asked.groups()
    size = f"{float(number) / 2 ** 30:.2f} GiB" if unit == "bytes" else f"{number} {unit}"
    return OUT_OF_MEMORY.format(size=f" (one allocation of {size})")


def main() -> None:
    """Run the app: a user's error is one line and exit 2, Ctrl-C exit 130, usage errors click's own code."""
    try:
        with _HELD_UNTIL_EXIT:
            code = app(standalone_mode=False)  # typer turns Ctrl-C into exit code 130 here
    except AttnprobeError as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        message = out_of_memory(error)
        if message is None:
            raise
        errors.print(f"[red]error:[/red] {message}", highlight=False)
        sys.exit(2)
    except typer.TyperException as error:  # usage errors (bad option values): one line too, click's exit code
        if not hasattr(error, "format_message"):
            raise
        if error.format_message():  # empty when the help was asked for by giving no command
            errors.print(f"[red]error:[/red] {error.format_message()} (see --help)", highlight=False)
        sys.exit(getattr(error, "exit_code", 2))
    if code == 130:
        errors.print(INTERRUPTED, highlight=False)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
