"""CPU cost of the census against plain Hugging Face calls on SmolLM2-135M, over prose of T tokens.

    python benchmarks/census_bench.py [--lengths 1024 2048 4096 8192] [--quick] [--out results.json]
    python benchmarks/census_bench.py --main [--threads 2]     the README's main command, each stage's share

--main times what `attnprobe census --out RUN && attnprobe figures RUN` does with default options, in one fresh
process: the model load, every census stage (seconds and share of the whole) and the figures with the report.

Every configuration runs in a fresh process (model loaded, peak RSS reset, then measured):
  plain    HF forward with SDPA, `model.hf(ids)` under no_grad
  stats    the census's statistics pass: NativeBackend with PatternStats(diagonals=(1,)) reads on every layer
  decode   the retrieval stage's decoding: after one prefill of the prompt, 20 greedy tokens with
           HF `generate` (KV cache) against `greedy_decode` with last-row argmax reads on every layer
           (what `run_sample` does), and `greedy_decode` without reads to isolate the reads' cost
  eager    eager attention with output_attentions=True (the T x T patterns every library returns),
           skipped where the returned patterns alone would not fit in the memory available
Prints markdown tables with the census/plain ratios and peak memory per 1K tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import common

SCRIPT = Path(__file__).resolve()
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
QUICK_LENGTHS = (256, 512)
EAGER_MAX = 4096  # eager is tried up to here; the memory check decides whether it runs


# ---- one configuration, in its own process ----------------------------------------------------

def _prompt(model, length: int):
    import torch

    from attnprobe.probe import texts

    return torch.tensor([texts.haystack_ids(model.tokenizer, length)])


def _forward(spec: dict, model, ids) -> dict:
    import torch

    from attnprobe.hooks.backends.native import NativeBackend
    from attnprobe.hooks.reducers import PatternStats
    from attnprobe.hooks.sites import Site

    info = model.info
    if spec["kind"] == "plain":
        def run():
            with torch.no_grad():
                return model.hf(input_ids=ids, use_cache=False)  # as backend.run: logits only, no KV cache
    elif spec["kind"] == "stats":
        backend = NativeBackend(model)

        def run():
            reads = {(layer, Site.PATTERN): PatternStats(diagonals=(1,)) for layer in range(info.n_layers)}
            return backend.run(ids, reads)
    else:  # eager with every pattern returned
        patterns_mb = info.n_layers * info.n_heads * ids.shape[1] ** 2 * 4 / 2 ** 20
        if patterns_mb > 0.6 * common.available_mb():
            return {"skipped": f"needs ~{patterns_mb / 1024:.1f} GB for the returned patterns; "
                               f"{common.available_mb() / 1024:.1f} GB available"}
        model.hf.set_attn_implementation("eager")

        def run():
            with torch.no_grad():
                return model.hf(input_ids=ids, output_attentions=True)
    memory = common.PeakMemory()
    memory.reset()
    first, steady = common.time_runs(run, spec["max_runs"], spec["budget_s"])
    return {"first_s": first, "steady_s": steady, "seconds": common.median_s(first, steady),
            "peak_mb": memory.peak_mb(), "peak_exact": memory.exact}


def _decode(spec: dict, model, ids) -> dict:
    """One prefill, then each decoding mode from a copy of its cache, modes interleaved over repeats."""
    import time

    import torch

    from attnprobe.hooks.backends.native import NativeBackend
    from attnprobe.hooks.reducers import PatternStats
    from attnprobe.hooks.sites import Site
    from attnprobe.probe.retrieval import extend_cache, greedy_decode

    new = spec["new_tokens"]
    ids = ids[:, : model.info.max_context - new]  # greedy_decode refuses prompts that leave no room
    prompt = ids[0].tolist()
    memory = common.PeakMemory()
    memory.reset()
    start = time.perf_counter()
    with torch.no_grad():
        cache = extend_cache(model, None, ids[:, :-1])
    prefill_s, prefill_mb = time.perf_counter() - start, memory.peak_mb()
    backend = NativeBackend(model)  # untouched layers still go to SDPA, as in the census

    def generate(past):
        out = model.hf.generate(ids, past_key_values=past, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return out.shape[1] - ids.shape[1]

    def loop(past):
        return len(greedy_decode(model, prompt, new, stop_at_newline=False, past=(past, len(prompt) - 1)))

    def census(past):
        reads = {(layer, Site.PATTERN): PatternStats(track_argmax=True) for layer in range(model.info.n_layers)}
        return len(greedy_decode(model, prompt, new, stop_at_newline=False, past=(past, len(prompt) - 1),
                                 decode_context=backend.patched([], reads)))

    modes = {"generate": generate, "loop": loop, "census": census}
    for fn in modes.values():  # warm-up: first calls pay one-time allocation and dispatch costs
        fn(copy.deepcopy(cache))
    times = {name: [] for name in modes}
    tokens = {}
    for _ in range(spec["repeats"]):
        for name, fn in modes.items():
            past = copy.deepcopy(cache)
            start = time.perf_counter()
            tokens[name] = fn(past)
            times[name].append(time.perf_counter() - start)
    return {"prompt_tokens": len(prompt), "prefill_s": prefill_s, "prefill_peak_mb": prefill_mb,
            "tokens": tokens, "seconds": {name: min(t) for name, t in times.items()},
            "peak_exact": memory.exact}


def _main_command(spec: dict) -> dict:
    """The README's main command in this process: load, census with default options (each stage timed), figures.

    Wall seconds and this process's CPU seconds per step: on a shared machine the wall time grows with the load,
    the CPU time much less, so the shares are read from the CPU time and both are printed as each step ends."""
    import tempfile
    import time

    import torch

    from attnprobe.analyses.presentation.report import write_report
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model
    from attnprobe.probe.census import Census, CensusConfig

    torch.set_num_threads(spec["threads"])
    steps: dict[str, dict] = {}
    clock = {"wall": time.perf_counter(), "cpu": time.process_time()}

    def finish(name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        steps[name] = {"wall_s": wall - clock["wall"], "cpu_s": cpu - clock["cpu"], "loadavg": common.loadavg()}
        clock.update(wall=wall, cpu=cpu)
        print(f"[census_bench] {name}: {steps[name]}", file=sys.stderr, flush=True)

    def progress(stage: str, done: int, total: int) -> None:
        if done == total and stage not in steps:
            finish(stage)

    model = load_model(spec["model"], device="cpu")
    finish("load model")
    with tempfile.TemporaryDirectory() as out:
        Census(model, make_backend("native", model), CensusConfig(), Path(out), progress).execute()
        write_report(Path(out), ("png", "svg"))
        finish("figures + report")
    return {"steps": steps, "wall_s": sum(v["wall_s"] for v in steps.values()), "cpu_s": sum(v["cpu_s"] for v in steps.values())}


def main_table(result: dict) -> str:
    rows = [{"step": name, "wall s": v["wall_s"], "CPU s": v["cpu_s"], "CPU share %": 100 * v["cpu_s"] / result["cpu_s"],
             "load at end": v["loadavg"][0]} for name, v in result["steps"].items()]
    rows.append({"step": "total", "wall s": result["wall_s"], "CPU s": result["cpu_s"], "CPU share %": 100.0})
    return ("### The README's main command (census with default options + figures), in one process\n\n"
            + common.markdown_table(rows, ["step", "wall s", "CPU s", "CPU share %", "load at end"]))


def child(spec: dict) -> None:
    import torch

    from attnprobe.hooks.model import load_model

    torch.set_num_threads(spec["threads"])
    model = load_model(spec["model"])
    for parameter in model.hf.parameters():  # page in memory-mapped weights so the peak is the run's own
        parameter.data.sum()
    ids = _prompt(model, spec["length"])
    result = _decode(spec, model, ids) if spec["kind"] == "decode" else _forward(spec, model, ids)
    common.emit({**spec, **result, "loadavg_end": common.loadavg()})


# ---- the parent: run every configuration, then tables -------------------------------------------

def measure(args) -> list[dict]:
    results = []
    for length in args.lengths:
        kinds = ["plain", "stats"] + (["decode"] if length <= args.decode_max else [])
        kinds += ["eager"] if length <= EAGER_MAX and not args.no_eager else []
        for kind in kinds:
            spec = {"kind": kind, "length": length, "model": args.model, "threads": args.threads,
                    "max_runs": args.max_runs, "budget_s": args.budget, "repeats": args.decode_repeats,
                    "new_tokens": args.new_tokens}
            print(f"[census_bench] T={length} {kind} ...", file=sys.stderr, flush=True)
            results.append(common.run_child(SCRIPT, spec, timeout_s=args.timeout))
            if "error" in results[-1]:
                print(f"[census_bench]   failed: {results[-1]['error']}", file=sys.stderr, flush=True)
    return results


def _find(results, kind, length):
    return next((r for r in results if r["kind"] == kind and r["length"] == length), {})


def _slope_mb_per_1k(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of peak MB against T, per 1K tokens."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 1024 * sum((t - mean_t) * (m - mean_m) for t, m in points) / var if var else None


def tables(results: list[dict], lengths) -> str:
    forward_rows, decode_rows = [], []
    for length in lengths:
        plain, stats, eager, decode = (_find(results, kind, length) for kind in ("plain", "stats", "eager", "decode"))
        row = {"T": length, "plain s": plain.get("seconds"), "census stats s": stats.get("seconds")}
        if row["plain s"] and row["census stats s"]:
            row["stats / plain"] = row["census stats s"] / row["plain s"]
        row["runs"] = f"{1 + len(plain.get('steady_s', []))}/{1 + len(stats.get('steady_s', []))}" if plain and stats else None
        row["plain peak MB"], row["stats peak MB"] = plain.get("peak_mb"), stats.get("peak_mb")
        for name, entry in (("plain", plain), ("stats", stats)):
            if entry.get("peak_mb") is not None:
                row[f"{name} MB/1K tok"] = entry["peak_mb"] / (length / 1024)
        if eager.get("seconds"):
            row["eager+attn s"], row["eager peak MB"] = eager["seconds"], eager["peak_mb"]
            if row["plain s"]:
                row["eager / plain"] = eager["seconds"] / row["plain s"]
        elif eager:
            row["eager+attn s"] = eager.get("skipped") or eager.get("error")
        forward_rows.append(row)
        if decode.get("seconds"):
            seconds, tokens = decode["seconds"], decode["tokens"]
            per_token = {name: 1000 * seconds[name] / max(tokens[name], 1) for name in seconds}
            decode_rows.append({
                "prompt T": decode["prompt_tokens"], "prefill s": decode["prefill_s"], "prefill peak MB": decode["prefill_peak_mb"],
                "new tokens": "/".join(str(tokens[name]) for name in ("generate", "loop", "census")),
                "HF generate ms/tok": per_token["generate"], "greedy_decode ms/tok": per_token["loop"],
                "census argmax reads ms/tok": per_token["census"],
                "census / generate": per_token["census"] / per_token["generate"],
                "census / greedy_decode": per_token["census"] / per_token["loop"]})
        elif decode:
            decode_rows.append({"prompt T": length, "prefill s": decode.get("error")})
    forward_columns = ["T", "plain s", "census stats s", "stats / plain", "runs", "plain peak MB", "stats peak MB",
                       "plain MB/1K tok", "stats MB/1K tok", "eager+attn s", "eager peak MB", "eager / plain"]
    decode_columns = ["prompt T", "prefill s", "prefill peak MB", "new tokens", "HF generate ms/tok",
                      "greedy_decode ms/tok", "census argmax reads ms/tok", "census / generate",
                      "census / greedy_decode"]
    slopes = []
    for kind in ("plain", "stats", "eager"):
        points = [(r["length"], r["peak_mb"]) for r in results if r["kind"] == kind and r.get("peak_mb") is not None]
        slope = _slope_mb_per_1k(points)
        if slope is not None:
            slopes.append(f"{kind}: {slope:.0f} MB per 1K tokens (least squares over T = {', '.join(str(t) for t, _ in points)})")
    text = ["### Forward pass: plain SDPA vs the census statistics pass (vs eager with output_attentions)",
            common.markdown_table(forward_rows, forward_columns),
            "Peak memory growth: " + ("; ".join(slopes) if slopes else "needs two lengths") + ".",
            "### Retrieval decoding: 20 greedy tokens after one prefill (ms per token, best of the repeats)",
            common.markdown_table(decode_rows, decode_columns)]
    return "\n\n".join(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", help=f"prose lengths in tokens (default {DEFAULT_LENGTHS})")
    parser.add_argument("--quick", action="store_true", help="smoke run: T=256, 512, one run each, 5 new tokens")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: steadier ratios on a shared machine)")
    parser.add_argument("--max-runs", type=int, default=3, help="forward runs per configuration, the first one warms up")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of forward runs per configuration")
    parser.add_argument("--decode-repeats", type=int, default=2, help="repeats of each decoding mode")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--decode-max", type=int, default=4096,
                        help="longest prompt for the decoding comparison (the census's retrieval uses <= 2048)")
    parser.add_argument("--no-eager", action="store_true", help="leave out eager attention")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before a configuration is abandoned")
    parser.add_argument("--out", type=Path, help="also write the raw results as JSON here")
    parser.add_argument("--main", action="store_true", help="time the README's main command, each stage's share")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return
    if args.main:
        facts = common.machine_facts(args.threads)  # this process is fresh: the command runs in it
        result = _main_command({"model": args.model, "threads": args.threads})
        facts["loadavg_end"] = common.loadavg()
        command = "python benchmarks/census_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        print("\n\n".join([common.header("The main command on CPU", facts, command.strip()),
                            f"load average at end {facts['loadavg_end']}", main_table(result)]))
        if args.out:
            args.out.write_text(json.dumps({"machine": facts, "result": result}, indent=1))
        return
    if args.quick:
        args.max_runs, args.decode_repeats, args.new_tokens = 1, 1, 5
    args.lengths = args.lengths or list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    facts = common.machine_facts(args.threads)
    command = "python benchmarks/census_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = measure(args)
    facts["loadavg_end"] = common.loadavg()
    report = "\n\n".join([common.header("Census vs plain HF on CPU (SmolLM2-135M, fp32)", facts, command.strip()),
                          f"load average at end {facts['loadavg_end']}", tables(results, args.lengths)])
    print(report)
    if args.out:
        args.out.write_text(json.dumps({"machine": facts, "results": results}, indent=1))


if __name__ == "__main__":
    main()
