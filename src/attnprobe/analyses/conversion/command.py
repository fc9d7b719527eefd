"""The `attnprobe convert` command: check everything, gather the data (with synthetic retrieval documents if asked),
select a head-level hybrid's KV heads, convert every row and the control, evaluate, write the gated matrix; or only
some parts of that, each resumable (conversion/parts.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import Backend
from attnprobe.hooks.model import Model
from attnprobe.kernels.registry import make_kernel

from attnprobe.analyses.conversion.data import TrainingData
from attnprobe.analyses.conversion.stage2 import FastPath
from attnprobe.analyses.conversion.rows import CONTROL, control_variant, conversion_matrix, parse_tokens, progress_bar
from attnprobe.analyses.conversion.train import ConvertConfig, Progress, stage_windows


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


def run(model: Model, out: Path, *, kernel: str | None, heads: str | None, layers: str | None, from_run: Path | None,
        variants: str | None, control: bool, tokens: str, transfer_tokens: str, length: int, batch: int, accumulation: int,
        lr: float, transfer_lr: float, train: str, lora_rank: int, ce_weight: float, data: Sequence[Path],
        dataset: str | None, epochs: int, seed: int, checkpoint_every: int, evaluate: bool, census: bool, quick: bool,
        console=None, recompute_layers: bool = False, hybrid=None, retrieval=None, parts: str | None = None,
        loss: str = "chunked"):
    """The `attnprobe convert` command: check everything, gather the data, convert every row, evaluate, write the matrix.
    `hybrid` (head_hybrid.HeadHybrid) adds a head-level hybrid row; `retrieval` (retrieval_data.RetrievalMix) mixes
    synthetic retrieval documents into the training windows. `parts` ("data,convert", "evaluate", ... see
    conversion/parts.py) runs only those parts in `out`, each resumable (a GPU converts, anything evaluates)."""
    import pandas as pd

    from attnprobe.hooks.backends import make_backend
    from attnprobe.kernels.registry import KERNELS
    from attnprobe.probe.rundir import write_parquet

    from attnprobe.analyses.experiments.architectures import MatrixSizes, Variant, catalogue, matrix_markdown
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.analyses.conversion.retrieval_data import mix_retrieval
    from attnprobe.analyses.experiments.selection import parse_heads

    heads_table = None
    if from_run is not None:
        if not (Path(from_run) / "heads.parquet").exists():
            raise AttnprobeError(f"{Path(from_run) / 'heads.parquet'} not found: run attnprobe census --out {from_run} first")
        heads_table = pd.read_parquet(Path(from_run) / "heads.parquet")
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
    if hybrid is not None:
        hybrid.check(model, from_run)
    if not chosen and not control and hybrid is None:
        raise AttnprobeError("say what to convert: --variants NAMES, or --kernel K with --heads/--layers (or keep --control)")
    if control:
        chosen.append(control_variant())
        if ce_weight == 0 and console is not None:  # tests/test_head_hybrid.py shows it
            console.print("[yellow]note:[/yellow] the control starts at its teacher, where the KL's gradient is zero: "
                          "without --ce-weight it stays the original model")
    config = ConvertConfig(length=length, batch=batch, accumulation=accumulation, transfer_tokens=parse_tokens(transfer_tokens),
                           tokens=parse_tokens(tokens), transfer_lr=transfer_lr, lr=lr, train=train, lora_rank=lora_rank,
                           ce_weight=ce_weight, checkpoint_every=checkpoint_every, seed=seed)
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
        plan = dict(epochs=epochs, recompute_layers=recompute_layers, retrieval=retrieval, paths=data, dataset=dataset)
        return _run_in_parts(model, out, parts, chosen, config, hybrid, from_run, plan, quick)
    steps = config.steps(config.transfer_tokens) + config.steps(config.tokens)
    bar, on_step = progress_bar(console, disable=not state.is_main_process)
    with bar:
        sampling = bar.add_task("training data", total=None, speed="", loss="")
        with state.main_process_first():  # the main process samples and caches; the others read its shards
            training = training_data(model, steps * config.batch * config.length, config.window or config.length, data, dataset, seed, epochs,
                                     progress=lambda done, total: bar.update(sampling, completed=done, total=total))
        bar.update(sampling, visible=False)
        if retrieval is not None:
            training = mix_retrieval(model, training, retrieval, *stage_windows(config), seed=seed)
        sizes = MatrixSizes.quick(census=census) if quick else MatrixSizes(census=census)
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
                  plan: dict, quick: bool):
    """`run` by parts (conversion/parts.py) in `out`: the control first, the matrix table if evaluated. A hybrid row's
    ranking is saved in out/selection by the first part that selects, so later parts keep its heads."""
    import functools

    from attnprobe.hooks.backends import make_backend

    from attnprobe.analyses.conversion import parts as staged
    from attnprobe.analyses.experiments.architectures import MatrixSizes

    wanted = staged.check_parts(parts)
    backend = make_backend("native", model)
    if hybrid is not None:
        if hybrid.selector == "kl-layers" and not (Path(out) / "selection" / "kl-layers-0.parquet").exists():
            raise AttnprobeError("the kl-layers selector trains on the run's data: run it without --part first, or pick another selector")
        chosen.append(hybrid_variant(model, backend, hybrid, census, out, config, None))
    ordered = [v for v in chosen if v.name == CONTROL] + [v for v in chosen if v.name != CONTROL]
    sizes = functools.partial(MatrixSizes.quick if quick else MatrixSizes)
    made = staged.run_parts(model, backend, wanted, staged.Plan(ordered, config, **plan), out, out, sizes, staged.RunLog(out))
    return made.get("matrix")
