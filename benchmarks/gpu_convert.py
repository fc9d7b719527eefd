"""Two-stage conversion of SmolLM2 on one GPU: stage-2 throughput and MFU (measured here), then the gated matrix
rows through the library's parts (attnprobe.analyses.conversion.parts: data, convert, finish, evaluate, census).

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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_bench import H200_BF16_PEAK, stage2_flops_per_token  # noqa: E402
from gpu_bench import import_attnprobe  # noqa: E402

ROWS = "all-hedgehog,window+linear,sink+window+linear,layers-1of2-softmax,layers-1of4-softmax"


def recipe(args, kernel, tokens, transfer_tokens):
    from attnprobe.analyses.conversion.train import ConvertConfig

    return ConvertConfig(kernel=kernel, length=args.length, batch=args.batch, accumulation=args.accumulation,
                         transfer_tokens=transfer_tokens, tokens=tokens, lr=args.lr, transfer_lr=args.transfer_lr,
                         ce_weight=args.ce_weight, checkpoint_every=25, seed=0)


def throughput(args, model, backend, results) -> dict:
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
    from attnprobe.analyses.conversion import rows as conversion
    from attnprobe.analyses.conversion.parts import PARTS, Plan, RunLog, run_parts
    from attnprobe.analyses.experiments.architectures import MatrixSizes, catalogue
    from attnprobe.analyses.conversion.config import parse_tokens
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model
    from attnprobe.probe.rundir import read_json, write_json

    results = RunLog(args.out)
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
    names = [n for n in args.rows.split(",") if n]
    variants = ([] if args.no_control else [conversion.control_variant()]) + [catalogue(model)[n] for n in names]  # the control first: every row is read against it
    config = recipe(args, None, read_json(plan_path)["tokens"], parse_tokens(args.transfer_tokens))
    given = {"niah_haystack": args.niah_haystack} if args.niah_haystack else {}
    if args.niah_lengths:
        given["niah_lengths"] = tuple(int(n) for n in args.niah_lengths.split(","))
    if args.census_induction_length is not None:
        given["census_induction_length"] = args.census_induction_length
    chosen = {"gpu": MatrixSizes.gpu, "cpu": MatrixSizes, "quick": MatrixSizes.quick}["quick" if args.quick else args.sizes]
    plan = Plan(variants, config, args.epochs, args.sample_batch, args.recompute_layers, pack=True)
    run_parts(model, backend, [p for p in PARTS if p in parts], plan, Path(args.work) / "run", args.out,
              functools.partial(chosen, **given), results)
    results.add("done", seconds=round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # attnprobe's bad-input errors are one line (importable once main has begun)
        from attnprobe.errors import AttnprobeError

        if not isinstance(error, AttnprobeError):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
