"""Two-stage conversion of SmolLM2 on one GPU: stage-2 throughput and MFU, then the gated matrix rows.

    python benchmarks/gpu_convert.py --model SmolLM2-135M-Instruct.Q4_1.gguf --part all --out $OUT \\
        [--tokens 4M] [--transfer-tokens 512K] [--length 512] [--batch 32] [--work /tmp/attnprobe-convert]

Parts (each resumes where the previous call stopped, as long as --work survives between calls):
    throughput  stage-1 and stage-2 steps of all-hedgehog and stage-2 steps of the control on random tokens:
                tokens/s, MFU (benchmarks/convert_bench.py counts the FLOPs), peak memory -> throughput.json
    data        the training windows: self-samples of the model (temperature 1, generated 1,024 at a time)
                mixed with the prose's training range; cached under --work
    convert     every row of --rows and the control, two stages each, checkpoints every 25 steps; after each
                row its fit and adapters go into $OUT (conversions-N.tar, under 15 MiB each)
    finish      each row of --rows stopped in stage 2 becomes a partial conversion from its last checkpoint (its
                budget the tokens trained so far, flagged `partial` in the matrix); runs anywhere
    evaluate    the matrix code on the original and every row converted under --work (recall at --sizes (MatrixSizes.gpu:
                30+ samples per task), held-out perplexity, the gate) -> matrix.md, matrix.parquet; needs neither a GPU
                nor the training data, so rows converted on the GPU (conversions-N.tar) are evaluated anywhere
    census      the matrix's small census re-run inside the original and every converted row (which mechanisms each
                keeps, in its own heads) -> census.parquet; like evaluate it runs anywhere
    all         throughput, data, convert and evaluate in order (or name several: --part throughput,data)

Everything written to $OUT is written as soon as it exists: results.jsonl (one line per finished step of the
plan: throughput, data, each row's conversion, each evaluated row), the tars, matrix.md. With --minutes M the
stage-2 budget per row is derived from the measured throughput so that converting every row takes about M
minutes (stage 1 takes --transfer-tokens on top).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import H200_BF16_PEAK, stage2_flops_per_token  # noqa: E402
from gpu_bench import import_attnprobe  # noqa: E402

ROWS = "all-hedgehog,window+linear,sink+window+linear,layers-1of2-softmax,layers-1of4-softmax"
TAR_LIMIT = 15 * 2 ** 20


class Results:
    """results.jsonl in $OUT, appended and flushed line by line."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.jsonl"

    def add(self, kind: str, **record) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"kind": kind, "time": time.strftime("%H:%M:%S"), **record}, default=str) + "\n")
        print(kind, json.dumps(record, default=str)[:400], flush=True)


def recipe(args, kernel, tokens, transfer_tokens):
    from attnprobe.analyses.conversion.train import ConvertConfig

    return ConvertConfig(kernel=kernel, length=args.length, batch=args.batch, accumulation=args.accumulation,
                         transfer_tokens=transfer_tokens, tokens=tokens, lr=args.lr, transfer_lr=args.transfer_lr,
                         ce_weight=args.ce_weight, checkpoint_every=25, seed=0)


def throughput(args, model, backend, results: Results) -> dict:
    """Timed steps on random tokens (speed does not depend on the text): the steps after the first two."""
    from attnprobe.analyses.conversion import rows as conversion, train as conversion_train
    from attnprobe.analyses.experiments.architectures import catalogue
    from attnprobe.analyses.conversion.data import TrainingData

    steps = args.bench_steps
    ids = torch.randint(0, model.hf.config.vocab_size, (2 * steps * args.batch, args.length),
                        generator=torch.Generator().manual_seed(0))
    data = TrainingData(ids, {"sha256": "random", "tokens": ids.numel()})
    flops = stage2_flops_per_token(model.hf.config, args.length)
    cuda = torch.cuda.is_available()
    report = {"length": args.length, "batch": args.batch, "recompute_layers": args.recompute_layers, "flops_per_token": flops,
              "device": torch.cuda.get_device_name() if cuda else "cpu"}
    variant = catalogue(model)["all-hedgehog"]
    for name, kernel, heads in (("all-hedgehog", "hedgehog", conversion.replaced_heads(model, variant.keep(model, None))),
                                ("control", None, {})):
        stamps: dict[str, list[float]] = {}

        def on_step(progress):
            stamps.setdefault(progress.stage, []).append(time.perf_counter())

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tokens = steps * args.batch * args.length
        where = Path(args.work) / "throughput" / name
        shutil.rmtree(where, ignore_errors=True)  # timed afresh on every call
        conversion_train.convert(model, backend, heads, recipe(args, kernel, tokens, tokens if heads else 0), data, where, on_step=on_step,
                           recompute_layers=args.recompute_layers)
        for stage, times in stamps.items():
            gaps = [b - a for a, b in zip(times[1:], times[2:])]  # steps 3.. (the first ones compile and allocate)
            rate = args.batch * args.length / (sum(gaps) / len(gaps)) if gaps else float("nan")
            entry = {"tokens_per_s": rate, "steps_timed": len(gaps)}
            if stage == "end_to_end":
                entry["mfu"] = rate * flops["mfu_count"] / H200_BF16_PEAK
                entry["mfu_needed_flops"] = rate * flops["needed"] / H200_BF16_PEAK
                entry["minutes_for_20M"] = 20e6 / rate / 60
            report[f"{name}/{stage}"] = entry
        report[f"{name}/peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    (Path(args.out) / "throughput.json").write_text(json.dumps(report, indent=1))
    results.add("throughput", **report)
    return report


def pack(args, names: list[str]) -> None:
    """Each finished row's fit/, adapters and manifest into tars of at most 15 MiB (no checkpoints)."""
    groups: list[list[Path]] = [[]]
    size = 0
    for name in names:
        folder = Path(args.work) / "run" / "conversions" / name
        if not (folder / "conversion.json").exists():
            continue
        files = [folder / "conversion.json", folder / "adapters.safetensors", *sorted((folder / "fit").glob("*"))]
        row_size = sum(f.stat().st_size for f in files if f.exists())
        if groups[-1] and size + row_size > TAR_LIMIT:
            groups.append([])
            size = 0
        groups[-1] += [f for f in files if f.exists()]
        size += row_size
    for index, group in enumerate(g for g in groups if g):
        target = Path(args.out) / f"conversions-{index + 1}.tar"
        with tarfile.open(str(target) + ".partial", "w") as tar:
            for file in group:
                tar.add(file, arcname=str(file.relative_to(Path(args.work) / "run")))
        os.replace(str(target) + ".partial", target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the SmolLM2 .gguf (or any model spec)")
    parser.add_argument("--part", default="all", help="throughput, data, convert, finish, evaluate, census (comma-separated) or all (the first three and evaluate)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_convert_out")))
    parser.add_argument("--work", default="/tmp/attnprobe-convert", help="run directory kept between calls")
    parser.add_argument("--rows", default=ROWS)
    parser.add_argument("--recompute-layers", action="store_true",
                        help="stage 2 keeps only each decoder layer's inputs (about one layer of activations, one more forward)")
    parser.add_argument("--no-control", action="store_true",
                        help="convert only --rows (another process converts the control into the same --work)")
    parser.add_argument("--tokens", default=None, help="stage-2 tokens per row (default: what --minutes chose, else 4M)")
    parser.add_argument("--minutes", type=float, default=None, help="instead of --tokens: minutes for all rows' stage 2")
    parser.add_argument("--transfer-tokens", default="512K")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--transfer-lr", type=float, default=1e-2)
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the sampled data (halves the sampling)")
    parser.add_argument("--bench-steps", type=int, default=10)
    parser.add_argument("--sizes", default="gpu", choices=["gpu", "cpu", "quick"],
                        help="evaluation sizes (architectures.MatrixSizes: gpu(), the CPU defaults, quick())")
    parser.add_argument("--niah-lengths", default=None, help="NIAH lengths of the evaluation, e.g. 8192,16384,32640 (default: --sizes')")
    parser.add_argument("--niah-haystack", default=None, help="text file whose evaluation range gives the NIAH haystacks (long contexts)")
    parser.add_argument("--census-induction-length", type=int, default=None,
                        help="period of the census's repeated string (default 50; past a hybrid's 64-token window, e.g. 128)")
    parser.add_argument("--sample-batch", type=int, default=1024, help="sequences per generate call of the self-sampling")
    parser.add_argument("--quick", action="store_true", help="tiny evaluation sizes; allowed on the CPU (a smoke run of the script)")
    args = parser.parse_args(argv)
    every = ["throughput", "data", "convert", "finish", "evaluate", "census"]
    parts = ["throughput", "data", "convert", "evaluate"] if args.part == "all" else [part.strip() for part in args.part.split(",")]
    if set(parts) - set(every):
        print(f"unknown --part {args.part}: choose from {', '.join(every)} or all")
        return 2
    if not torch.cuda.is_available() and not args.quick and set(parts) - {"finish", "evaluate", "census"}:
        print("no CUDA device: training needs a GPU (--part finish,evaluate,census run anywhere; --quick is a smoke run on the CPU)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ATTNPROBE_CACHE", str(Path(args.work) / "cache"))
    import_attnprobe()
    from attnprobe.analyses.conversion import rows as conversion, train as conversion_train
    from attnprobe.analyses.conversion.config import parse_tokens
    from attnprobe.analyses.experiments.architectures import MatrixSizes, catalogue, matrix_markdown
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model
    from attnprobe.kernels import fla
    from attnprobe.probe.rundir import read_json, write_json

    results = Results(args.out)
    started = time.perf_counter()
    model = load_model(args.model)  # fp32 weights; on CUDA accelerate runs training under bf16 autocast
    backend = make_backend("native", model)
    results.add("loaded", model=args.model, seconds=round(time.perf_counter() - started, 1))
    plan_path = Path(args.work) / "plan.json"  # the budget --minutes chose, kept for the later calls
    if "throughput" in parts:
        report = throughput(args, model, backend, results)
        if args.minutes is not None:  # the control costs about as much as a converted row
            rate = report["all-hedgehog/end_to_end"]["tokens_per_s"]
            per_row = int(rate * args.minutes * 60 / (len(args.rows.split(",")) + 1))
            write_json(plan_path, {"tokens": max(1, per_row // (args.batch * args.length)) * args.batch * args.length})
    if args.tokens is not None or not plan_path.exists():
        write_json(plan_path, {"tokens": parse_tokens(args.tokens or "4M")})
    plan = read_json(plan_path)
    names = [n for n in args.rows.split(",") if n]
    variants = ([] if args.no_control else [conversion.control_variant()]) + [catalogue(model)[n] for n in names]  # the control first: every row is read against it
    config = recipe(args, None, plan["tokens"], parse_tokens(args.transfer_tokens))
    steps = config.steps(config.transfer_tokens) + config.steps(config.tokens)
    if set(parts) & {"data", "convert"}:  # evaluating reads the conversions' own manifests, not this plan
        results.add("plan", tokens=config.tokens, transfer_tokens=config.transfer_tokens, rows=names)
        began = time.perf_counter()
        data = training_data(model, steps * config.batch * config.length, config.length, epochs=args.epochs,
                             sample_batch=args.sample_batch)
        results.add("data", seconds=round(time.perf_counter() - began, 1), **data.description)
    run = Path(args.work) / "run"
    given = {"niah_haystack": args.niah_haystack} if args.niah_haystack else {}
    if args.niah_lengths:
        given["niah_lengths"] = tuple(int(n) for n in args.niah_lengths.split(","))
    if args.census_induction_length is not None:
        given["census_induction_length"] = args.census_induction_length
    chosen = {"gpu": MatrixSizes.gpu, "cpu": MatrixSizes, "quick": MatrixSizes.quick}["quick" if args.quick else args.sizes]
    preset = functools.partial(chosen, **given)
    if "convert" in parts:
        failed = []
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
                conversion.conversion_matrix(model, backend, [variant], config, data, run, None, evaluate=False, on_step=on_step,
                                             recompute_layers=args.recompute_layers)
            except Exception as error:  # one row's failure (a kernel's backward, memory) does not cost the other rows
                if variant.name == "control":
                    raise
                results.add("failed", row=variant.name, error=f"{type(error).__name__}: {error}"[:2000], last_step=last)
                failed.append(variant)
                continue
            manifest = read_json(run / "conversions" / variant.name / "conversion.json")
            results.add("converted", row=variant.name, seconds=round(time.perf_counter() - began, 1), budget=manifest["budget"],
                        first_batch_kl=manifest["losses"].get("first_batch_kl"), last_step=last,
                        stage2_median_tokens_per_s=round(sorted(rates)[len(rates) // 2]) if rates else None,
                        transfer_loss=(manifest["losses"].get("transfer") or [None])[-1:],
                        mean_head_error=_mean(manifest["head_error"]),
                        fla_backward_errors={str(key): error for key, error in fla.backward_errors.items()},
                        peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None)
            pack(args, [v.name for v in variants])
        variants = [v for v in variants if v not in failed]
    if "finish" in parts:
        for variant in variants:
            directory = run / "conversions" / variant.name
            if (directory / "checkpoint.json").exists() and not (directory / "conversion.json").exists():
                manifest = conversion_train.conversion_from_checkpoint(model, directory)
                results.add("finished from checkpoint", row=variant.name, partial=manifest["partial"], budget=manifest["budget"])
    if "evaluate" in parts:
        sizes = preset(census=False)  # the census part below runs the census on its own

        def status(message):  # each evaluated row reaches $OUT before the next starts
            if message.startswith("evaluating") and (run / "variants").exists():
                rows = [read_json(f) for f in sorted((run / "variants").glob("*.json"))]
                (args.out / "rows.json").write_text(json.dumps(rows, default=str))
            print(message, flush=True)
        table, _ = conversion.evaluate_conversions(model, backend, variants, run, sizes, None, status)  # the rows converted above
        table.to_parquet(args.out / "matrix.parquet", index=False)
        (args.out / "matrix.md").write_text(matrix_markdown(table.drop(columns=["conversion"], errors="ignore")))
        shown = [c for c in ("architecture", "perplexity", "ppl_vs_control", "gate", "passkey_acc", "kv_recall_acc", "copy_acc",
                             "niah_acc") if c in table]
        results.add("matrix", rows=table[shown].to_dict("records"))
    if "census" in parts:
        table = conversion.census_of_conversions(model, backend, variants, run, preset(), None, status=lambda m: print(m, flush=True))
        table.to_parquet(args.out / "census.parquet", index=False)
        results.add("census", rows=table.to_dict("records"))
    results.add("done", seconds=round(time.perf_counter() - started, 1))
    return 0


def _mean(errors: dict) -> float | None:
    values = [v for per_layer in errors.values() for v in per_layer]
    return sum(values) / len(values) if values else None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # attnprobe's bad-input errors are one line (importable once main has begun)
        from attnprobe.errors import AttnprobeError

        if not isinstance(error, AttnprobeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
