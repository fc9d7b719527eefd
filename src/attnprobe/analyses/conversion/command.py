"""The `attnprobe convert` command: check everything, gather the data (with synthetic retrieval documents if asked),
select a head-level hybrid's KV heads, convert every row and the control, evaluate, write the gated matrix; or only
some parts of that, each resumable (conversion/parts.py)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import Backend
from attnprobe.hooks.model import Model
from attnprobe.kernels.registry import make_kernel

from attnprobe.analyses.conversion.data import TrainingData
from attnprobe.analyses.conversion.stage2 import FastPath
from attnprobe.analyses.conversion.rows import CONTROL, control_variant, conversion_matrix, progress_bar
from attnprobe.analyses.conversion.train import ConvertConfig, Progress, stage_data_windows


def hybrid_variant(model: Model, backend: Backend, hybrid, census: Path | None, out: Path, config: ConvertConfig,
                   data: TrainingData, on_step: Callable[[Progress], None] = lambda p: None):
    """The head-level hybrid row of `hybrid`: its selector's kept KV heads softmax, the rest its family. The
    kl-layers selector runs its short conversions (`kl_tokens` per stage, 2 steps each by default) on `data`."""
    import dataclasses

    from attnprobe.analyses.conversion import head_hybrid

    tokens = hybrid.kl_tokens or 2 * config.batch * config.length
    short = dataclasses.replace(config, transfer_tokens=tokens, tokens=tokens)
    units = head_hybrid.kept_kv_heads(model, backend, hybrid, census, out, kl=lambda: head_hybrid.kl_layer_scores(
        model, backend, hybrid.family, short, data, Path(out) / "selection" / "kl", on_step))
    head_hybrid.write_overlap(model, backend, hybrid, census, out)
    return head_hybrid.variant(model, hybrid, units)


def run(model: Model, out: Path, config: ConvertConfig, **options):
    """The `attnprobe convert` command (see `_run`), holding `out` for this run: a second convert into the same
    directory is refused, not interleaved (under accelerate launch, the main process holds it for all)."""
    from accelerate import PartialState

    from attnprobe.probe.rundir import RunDir

    with RunDir(out).lock() if PartialState().is_main_process else nullcontext():
        return _run(model, Path(out), config, **options)


def _run(model: Model, out: Path, config: ConvertConfig, *, variants: str | None, kernel: str | None, heads: str | None,
        layers: str | None, from_run: Path | None, control: bool, data: Sequence[Path], dataset: str | None, epochs: int,
        sample_batch: int | None = None,
        evaluate: bool, census: bool, quick: bool, console=None, recompute_layers: bool = False, hybrid=None, retrieval=None,
        parts: str | None = None, loss: str = "chunked", sizes=None):
    """The `attnprobe convert` command: check everything, gather the data, convert every row, evaluate, write the matrix.
    `hybrid` (head_hybrid.HeadHybrid) adds a head-level hybrid row; `retrieval` (retrieval_data.RetrievalMix) mixes
    synthetic retrieval documents into the training windows. `parts` ("data,convert", "evaluate", ... see
    conversion/parts.py) runs only those parts in `out`, each resumable (a GPU converts, anything evaluates).
    `sizes(**overrides)` gives the evaluation's MatrixSizes (default: the CPU sizes, or the quick ones with `quick`)."""
    from attnprobe.hooks.backends import make_backend
    from attnprobe.probe.rundir import write_parquet

    from attnprobe.analyses.experiments.architectures import MatrixSizes, matrix_markdown
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.analyses.conversion.retrieval_data import mix_retrieval
    from attnprobe.analyses.experiments.selection import heads_table as read_heads
    from attnprobe.analyses.experiments.variants import resolve

    if sizes is None:
        import functools

        sizes = functools.partial(MatrixSizes.quick if quick else MatrixSizes)
    heads_table = read_heads(from_run) if from_run is not None else None
    wanted = variants or kernel is not None or heads or layers
    chosen = [v for v in resolve(model, variants, kernel, heads, layers, from_run, "convert", config.seed)
              if v.name != "original"] if wanted else []
    seed, ce_weight = config.seed, config.ce_weight
    if hybrid is not None:
        hybrid.check(model, from_run)
    if not chosen and not control and hybrid is None:
        raise AttnprobeError("say what to convert: --variants NAMES, or --kernel K with --heads/--layers (or keep --control)")
    if control:
        chosen.append(control_variant())
        if ce_weight == 0 and console is not None:  # tests/test_head_hybrid.py shows it
            console.print("[yellow]note:[/yellow] the control starts at its teacher, where the KL's gradient is zero: "
                          "without --ce-weight it stays the original model")
    from accelerate import PartialState

    state = PartialState()
    config.check(state.num_processes)
    config.check_length(model.info.max_context)
    fast = FastPath(loss=loss)
    fast.check(ce_weight)
    if retrieval is not None:
        retrieval.check(config.length, model.info.max_context)
    for variant in chosen:  # every kernel and head selection is checked before anything trains
        if variant.kernel:
            make_kernel(variant.kernel, 1, model.info.head_dim)
            variant.keep(model, heads_table)
    if parts is not None:
        plan = dict(epochs=epochs, recompute_layers=recompute_layers, retrieval=retrieval, paths=data, dataset=dataset,
                    sample_batch=sample_batch)
        return _run_in_parts(model, out, parts, chosen, config, hybrid, from_run, plan, sizes)
    steps = config.steps(config.transfer_tokens) + config.steps(config.tokens)
    bar, on_step = progress_bar(console, disable=not state.is_main_process)
    with bar:
        sampling = bar.add_task("training data", total=None, speed="", loss="")
        with state.main_process_first():  # the main process samples and caches; the others read its shards
            training = training_data(model, steps * config.batch * config.length, config.window or config.length, data, dataset, seed, epochs,
                                     progress=lambda done, total: bar.update(sampling, completed=done, total=total),
                                     sample_batch=sample_batch)
        bar.update(sampling, visible=False)
        if retrieval is not None:
            training = mix_retrieval(model, training, retrieval, *stage_data_windows(config), seed=seed)
        sizes = sizes(census=census)
        backend = make_backend("native", model)
        if hybrid is not None:  # selected on this run's training data, before any row trains
            chosen.insert(0, hybrid_variant(model, backend, hybrid, from_run, out, config, training,
                                            on_step=lambda report: on_step(report, "kl-layers selection")))
        table, recall = conversion_matrix(model, backend, chosen, config, training, out, sizes, heads_table, evaluate,
                                          on_step=on_step, recompute_layers=recompute_layers, fast=fast)
    if table is None:
        return None
    write_parquet(out / "matrix.parquet", table)
    write_parquet(out / "recall.parquet", recall)
    (out / "matrix.md").write_text(matrix_markdown(table.drop(columns=["conversion"], errors="ignore")))
    return table



def _run_in_parts(model: Model, out: Path, parts: str, chosen: list, config: ConvertConfig, hybrid, census: Path | None,
                  plan: dict, sizes):
    """`run` by parts (conversion/parts.py) in `out`: the control first, the matrix table if evaluated. A hybrid row's
    ranking is saved in out/selection by the first part that selects, so later parts keep its heads."""
    from attnprobe.hooks.backends import make_backend

    from attnprobe.analyses.conversion import parts as staged

    wanted = staged.check_parts(parts)
    backend = make_backend("native", model)
    if hybrid is not None:
        if hybrid.selector == "kl-layers" and not (Path(out) / "selection" / "kl-layers-0.parquet").exists():
            raise AttnprobeError("the kl-layers selector trains on the run's data: run it without --part first, or pick another selector")
        chosen.append(hybrid_variant(model, backend, hybrid, census, out, config, None))
    ordered = [v for v in chosen if v.name == CONTROL] + [v for v in chosen if v.name != CONTROL]
    made = staged.run_parts(model, backend, wanted, staged.Plan(ordered, config, **plan), out, out, sizes, staged.RunLog(out))
    return made.get("matrix")
