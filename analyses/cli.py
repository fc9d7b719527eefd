"""The `attnprobe` command line. User errors print one line and exit 2; no tracebacks."""
from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attnprobe.hooks.errors import AttnprobeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="attnprobe: find attention mechanisms (retrieval heads, sinks, massive activations, induction "
                       "heads) in a softmax model, ablate or replace heads with linear/hybrid kernels, and measure what is lost.")
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # an error stays on one line, however narrow the terminal
ModelOption = typer.Option("smollm2-135m", "--model", "-m",
                           help="smollm2-135m, gemma3-270m, a local HF directory, a .gguf file, or a hub id")
BackendOption = typer.Option("native", "--backend", "-b", help="native | transformer-lens | nnsight")


def _load(spec: str):
    from attnprobe.hooks.model import load_model

    with console.status(f"loading {spec}"):
        start = time.time()
        model = load_model(spec)
    console.print(f"[dim]loaded {spec} in {time.time() - start:.1f} s[/dim]")
    return model


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnprobeError(f"{name} takes comma-separated numbers, got '{text}'") from None


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
def census(
    model: str = ModelOption,
    backend: str = BackendOption,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/census-MODEL-TIME); rerun with the same --out to resume"),
    lengths: str = typer.Option("512,1024,2048", help="NIAH context lengths in tokens"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle depths (0-1)"),
    needles: int = typer.Option(2, help="needles per (length, depth)"),
    bos: str = typer.Option("auto", help="prepend BOS: auto (tokenizer's convention) | on | off"),
    texts: Optional[Path] = typer.Option(None, help="natural text file for sinks, massive activations, perplexity (default: pydoc prose)"),
    haystack: Optional[Path] = typer.Option(None, help="haystack text file for NIAH (default: pydoc prose)"),
    sink_sequences: int = typer.Option(100, help="sequences for the sink rate (T=64 reference protocol)"),
    sink_eps: float = typer.Option(0.3, help="sink threshold eps"),
    hidden_threshold: float = typer.Option(0.1, help="alpha_k above which a non-initial token is a hidden sink"),
    retrieval_threshold: float = typer.Option(0.1, help="retrieval score above which a head is a retrieval head"),
    induction_threshold: float = typer.Option(0.4, help="threshold for induction heads"),
    previous_threshold: float = typer.Option(0.4, help="threshold for previous-token heads"),
    prose_length: int = typer.Option(512, help="tokens per prose sequence (hidden/secondary sinks, massive activations)"),
    seed: int = typer.Option(0),
    skip: str = typer.Option("", help="comma-separated stages to skip: sinks, induction, prose, massive_intervention, retrieval"),
) -> None:
    """Run the head census and write a run directory.

    Writes manifest.json, heads.parquet (one row per head: every score, kv_head, layer_type, roles),
    sink_rate.json, sinks.parquet (hidden-sink events), secondary_sinks.parquet, massive.parquet,
    massive_layers.parquet, massive_intervention.parquet, niah_samples.jsonl and retrieval_heads.json.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from attnprobe.hooks.backend import make_backend
    from attnprobe.probe.census import Census, CensusConfig

    config = CensusConfig(bos=bos, seed=seed, texts=str(texts) if texts else None, haystack=str(haystack) if haystack else None,
                          lengths=[int(x) for x in _floats(lengths, "--lengths")], depths=_floats(depths, "--depths"),
                          needles=needles, sink_sequences=sink_sequences, sink_eps=sink_eps, hidden_threshold=hidden_threshold,
                          retrieval_threshold=retrieval_threshold, induction_threshold=induction_threshold,
                          previous_threshold=previous_threshold, prose_length=prose_length)
    unknown = [s for s in skip.split(",") if s and s not in Census.STAGES]
    if unknown:
        raise AttnprobeError(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(Census.STAGES)}")
    loaded = _load(model)
    out = out or Path("runs") / f"census-{Path(model).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    start = time.time()
    with Progress(TextColumn("{task.description:<22}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        tasks = {}

        def progress(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        census_run = Census(loaded, make_backend(backend, loaded), config, out, progress)
        heads = census_run.execute(tuple(s for s in Census.STAGES if s not in skip.split(",")))
    console.print(f"census of {model} finished in {time.time() - start:.0f} s -> {out}")
    print_summary(out, heads)


@app.command()
def figures(
    run_dir: Path = typer.Argument(..., help="a run directory written by census, ablate or swap"),
    formats: str = typer.Option("png,svg", "--format", help="comma-separated: png, svg, pdf"),
) -> None:
    """Draw every figure the run's tables allow into RUN_DIR/figures/ and write RUN_DIR/report.html.

    The report is one self-contained file (images inlined, no network). Figures whose tables the run
    lacks are skipped and listed."""
    from attnprobe.analyses.report import write_report

    if not run_dir.is_dir():
        raise AttnprobeError(f"run directory not found: {run_dir}")
    with console.status("drawing figures"):
        report = write_report(run_dir, tuple(f.strip() for f in formats.split(",") if f.strip()))
    drawn = sorted((run_dir / "figures").glob("*.png")) if (run_dir / "figures").exists() else []
    console.print(f"{len(drawn)} figures in {run_dir / 'figures'}; report: {report}")


def print_summary(out: Path, heads) -> None:
    """Top retrieval heads, sink rate, massive activations and induction heads of a run."""
    import json

    import pandas as pd

    rate = json.loads((out / "sink_rate.json").read_text()) if (out / "sink_rate.json").exists() else {}
    if rate:
        parts = [f"{k.replace('_', ' ')} {rate[k]:.1f} %" for k in ("with_bos", "without_bos") if k in rate]
        console.print(f"[bold]sink rate[/bold] Sink_1^{rate['eps']} at T={rate['T']}: " + ", ".join(parts))
    if "retrieval_score" in heads:
        top = heads.sort_values("retrieval_score", ascending=False).head(10)
        n_ret = int((heads["retrieval_score"] > 0.1).sum())
        zero = 100 * float((heads["retrieval_score"] == 0).mean())
        console.print(f"[bold]retrieval heads[/bold] {n_ret} of {len(heads)} score > 0.1 ({zero:.0f} % score 0); top: "
                      + ", ".join(f"{r.layer}.{r.head}={r.retrieval_score:.2f}" for r in top.itertuples()))
    if (out / "massive.parquet").exists():
        massive = pd.read_parquet(out / "massive.parquet")
        if massive.empty:
            console.print("[bold]massive activations[/bold] none found")
        else:
            dims = massive.groupby("dim")["value"].agg(lambda v: v.abs().max()).sort_values(ascending=False)
            tokens = massive["token"].value_counts().head(4)
            console.print(f"[bold]massive activations[/bold] layers {massive['layer'].min()}-{massive['layer'].max()}, dims "
                          + ", ".join(f"{d} (max {v:,.0f})" for d, v in dims.head(4).items())
                          + "; tokens " + ", ".join(f"{t!r} x{n}" for t, n in tokens.items()))
    if "induction_score" in heads:
        top = heads[heads["induction_score"] > 0.4].sort_values("induction_score", ascending=False)
        console.print(f"[bold]induction heads[/bold] {len(top)} above 0.4: "
                      + ", ".join(f"{r.layer}.{r.head}={r.induction_score:.2f}" for r in top.head(10).itertuples()))
    if "prev_token_score" in heads:
        top = heads[heads["prev_token_score"] > 0.4].sort_values("prev_token_score", ascending=False)
        console.print(f"[bold]previous-token heads[/bold] {len(top)} above 0.4: "
                      + ", ".join(f"{r.layer}.{r.head}={r.prev_token_score:.2f}" for r in top.head(10).itertuples()))


def main() -> None:
    try:
        app(standalone_mode=False)
    except AttnprobeError as error:
        errors.print(f"[red]error:[/red] {error}", highlight=False)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted: rerun the same command to resume")
        sys.exit(130)
    except Exception as error:  # click usage errors carry their own exit code
        import click

        if isinstance(error, click.exceptions.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    main()
