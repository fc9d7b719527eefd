"""Decode cost of each architecture beside the original, measured side by side in one run (issue 17.5).

For every context length and architecture: prefill time, decode tokens/s, peak memory and the bytes the
architecture's own cache holds (hooks/cache.py: kept K/V + kernel states), and each as a ratio to the
original at the same length. Results go into --out as they come: decode_bench.jsonl (one line per
measurement), decode_bench.json and decode_bench.md (rewritten after each).

    # GPU (the main session): SmolLM2 in bf16 at 2K / 8K / 32K
    python benchmarks/decode_bench.py --device cuda --dtype bfloat16 --contexts 2048,8192,32768 --new-tokens 64 --out $OUT
    # the same with 8 sequences decoded together (reading the cache, not launching kernels, dominates)
    python benchmarks/decode_bench.py --device cuda --dtype bfloat16 --contexts 2048,8192,32768 --batch 8 --out $OUT/batch8
    # where a step's time goes (profiler tables and host syncs per row, in $OUT/profile)
    python benchmarks/decode_bench.py --device cuda --dtype bfloat16 --contexts 32768 --new-tokens 16 --profile --out $OUT/profile
    # each step replayed as a CUDA graph (the original over a StaticCache) beside the eager steps
    python benchmarks/decode_bench.py --device cuda --dtype bfloat16 --contexts 2048,32768 --modes eager,graph --out $OUT/graph
    # CPU, small: a tiny random GQA Llama (what the test runs)
    python benchmarks/decode_bench.py --tiny --contexts 64,128 --new-tokens 8 --out /tmp/decode_bench

Architectures (fresh kernels: cost does not depend on fitted parameters):
    original          the softmax model, transformers' own cache layers
    all-hedgehog      every head linear (Triton chunked prefill + Triton decode step on CUDA)
    all-gated-deltanet  every head Gated DeltaNet, when the registry has it (torch recurrent step)
    hybrid-25         25 % of the heads exact softmax, packed into whole KV groups (GQA) so the other
                      KV heads drop their cache; the rest sink+window
    sink+window       every head StreamingLLM sink + window softmax
Each measurement prefills `context - new_tokens - warmup` tokens, decodes `warmup` tokens untimed (first
calls at these shapes) and `new_tokens` timed ones (CUDA events on a GPU), so the cache ends at the context
length. The original runs before the native backend is attached: transformers' SDPA and its own cache, no
attnprobe hook.

Modes (--modes): `eager` launches every step's kernels from Python; `graph` captures one step as a CUDA
graph after the warm-up and replays it (hooks/cache.py StaticStep: the original over a transformers
StaticCache of exactly the context, a replaced model with its states updated in place), so a step costs its
GPU work alone. Only architectures whose step reads fixed-size tensors qualify (the original and the all-
rows); the others are left out of that mode. On CPU `graph` runs the same static step eagerly. Ratios
compare with the original of the same mode; `tokens_equal_eager` is the share of a graph row's greedy
tokens equal to its eager row's (when both ran).

What batch 1 measures: for a 135M model one decode step is a few hundred small kernels, so on a GPU the
step time is mostly launch and Python time, about the same for every architecture; attention over a 32K
cache (SmolLM2: 3 KV heads x 30 layers, ~0.75 GB read per token in bf16) is a fraction of it. The cost
that grows with the cache shows at --batch 8 or more, where reading (and transformers' DynamicLayer
re-concatenating) the cache dominates. --profile writes, per row, a profiler table of 4 more steps and
the source lines that synchronised the host (CUDA), to see where a step's time goes. A context beyond the model's window runs on random weights in the model's
shape (same config, longer position range): the cost of a forward does not depend on the weights; the
output records `weights: random` for those rows.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from attnprobe.hooks.backends import make_backend
from attnprobe.hooks.cache import graph_capturable, measure_decoding
from attnprobe.errors import AttnprobeError
from attnprobe.io import atomic_write_text
from attnprobe.hooks.model import DEFAULT_MODEL, Model, describe, load_model
from attnprobe.hooks.swap import kernel_edit
from attnprobe.kernels.registry import KERNELS, make_kernel

EXACT_SHARE = 0.25


def exact_heads(model: Model, share: float = EXACT_SHARE) -> dict[int, list[int]]:
    """`share` of all heads, filling whole KV groups first (KV head 0 of every layer, then 1, ...), so the
    fewest KV heads keep a cache."""
    info = model.info
    group = info.n_heads // info.n_kv_heads
    wanted = round(share * info.n_layers * info.n_heads)
    chosen: dict[int, list[int]] = {}
    for kv in range(info.n_kv_heads):
        for layer in range(info.n_layers):
            for head in range(kv * group, (kv + 1) * group):
                if wanted == 0:
                    return chosen
                chosen.setdefault(layer, []).append(head)
                wanted -= 1
    return chosen


def architecture_edits(model: Model, name: str) -> list:
    info = model.info
    everyone = list(range(info.n_heads))

    def replace(kernel: str, heads_of) -> list:
        edits = []
        for layer in range(info.n_layers):
            heads = heads_of(layer)
            if heads:
                edits.append(kernel_edit(layer, heads, make_kernel(kernel, len(heads), info.head_dim).to(model.device)))
        return edits

    if name == "original":
        return []
    if name.startswith("all-"):
        return replace(name[4:], lambda layer: everyone)
    if name == "sink+window":
        return replace("sink+window", lambda layer: everyone)
    if name == "hybrid-25":
        exact = exact_heads(model)
        return replace("sink+window", lambda layer: [h for h in everyone if h not in exact.get(layer, [])])
    raise AttnprobeError(f"unknown architecture {name!r}: choose among {', '.join(default_architectures())}")


def default_architectures() -> list[str]:
    names = ["original", "all-hedgehog"]
    if "gated-deltanet" in KERNELS:
        names.append("all-gated-deltanet")
    return names + ["hybrid-25", "sink+window"]


class ByteTokenizer:
    """All `describe` needs of a tokenizer, for the tiny random model."""

    bos_token_id = 1

    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [1] + [3 + b % 250 for b in text.encode()]})()


def tiny_model(device: str, dtype: torch.dtype) -> Model:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    hf = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    return Model(hf, ByteTokenizer(), describe(hf, ByteTokenizer(), "tiny-random-llama", "none", "random"))


def random_weights_like(model: Model, positions: int) -> Model:
    """The model's architecture with random weights and a position range of `positions`."""
    config = type(model.hf.config).from_dict(model.hf.config.to_dict())
    config.max_position_embeddings = positions
    torch.manual_seed(0)
    param = next(model.hf.parameters())
    with torch.device(param.device):
        hf = type(model.hf)(config).to(dtype=param.dtype).eval()
    return Model(hf, model.tokenizer, describe(hf, model.tokenizer, f"{model.info.model_id} (random weights)", "none", "random"))


def markdown(rows: list[dict]) -> str:
    lines = ["| context | mode | architecture | weights | cache MB | cache / original | decode tok/s | decode speed-up "
             "| prefill ms | prefill / original | peak MB | peak / original |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['context']} | {r['decode_mode']} | {r['architecture']} | {r['weights']} | {r['kv_cache_bytes_measured'] / 1e6:.2f} "
                     f"| {r.get('cache_ratio', math.nan):.3f} | {r['decode_tokens_per_s']:.1f} | {r.get('decode_speedup', math.nan):.2f} "
                     f"| {r['prefill_ms']:.1f} | {r.get('prefill_ratio', math.nan):.2f} | {r['peak_memory_bytes'] / 1e6:.1f} "
                     f"| {r.get('peak_ratio', math.nan):.3f} |")
    return "\n".join(lines) + "\n"


def ratios(row: dict, original: dict | None) -> dict:
    if original is None:
        return {}
    safe = lambda a, b: a / b if b else math.nan  # noqa: E731
    return {"cache_ratio": safe(row["kv_cache_bytes_measured"], original["kv_cache_bytes_measured"]),
            "decode_speedup": safe(row["decode_tokens_per_s"], original["decode_tokens_per_s"]),
            "prefill_ratio": safe(row["prefill_ms"], original["prefill_ms"]),
            "peak_ratio": safe(row["peak_memory_bytes"], original["peak_memory_bytes"])}


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked on the longest context measured, in each decode mode."""
    longest = max(r["context"] for r in rows)
    lines = []
    for mode in dict.fromkeys(r["decode_mode"] for r in rows):
        at = {r["architecture"]: r for r in rows if r["context"] == longest and r["decode_mode"] == mode}
        for name, row in at.items():
            if name.startswith("all-") and "decode_speedup" in row:
                ok = row["decode_speedup"] >= 2 and row["cache_ratio"] <= 0.1
                lines.append(f"{name} at {longest} ({mode}): decode x{row['decode_speedup']:.2f} (goal >= 2), cache "
                             f"x{row['cache_ratio']:.4f} (goal <= 0.1): {'met' if ok else 'NOT met'}")
        if "hybrid-25" in at and "cache_ratio" in at["hybrid-25"]:
            ratio = at["hybrid-25"]["cache_ratio"]
            lines.append(f"hybrid-25 at {longest} ({mode}): cache x{ratio:.3f} (goal <= 1/3): {'met' if ratio <= 1 / 3 else 'NOT met'}")
    return lines


def run(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_model(device, dtype) if args.tiny else load_model(args.model, dtype=dtype, device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",")]
    names = args.architectures.split(",") if args.architectures else default_architectures()
    machine = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
               "torch": torch.__version__, "dtype": args.dtype, "model": model.info.model_id, "new_tokens": args.new_tokens,
               "batch": args.batch, "warmup": args.warmup, "modes": args.modes,
               "command": " ".join(sys.argv)}
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - {"eager", "graph"})
    if unknown:
        raise AttnprobeError(f"unknown decode modes {unknown}: choose among eager, graph")
    rows: list[dict] = []
    failures: list[dict] = []
    stream = (out / "decode_bench.jsonl").open("a")

    def save():  # rewritten after each row or failure
        found = goals(rows) if rows else []
        atomic_write_text(out / "decode_bench.json", json.dumps({"machine": machine, "rows": rows, "goals": found,
                                                                 "failures": failures}, indent=1))
        atomic_write_text(out / "decode_bench.md", f"{json.dumps(machine)}\n\n" + markdown(rows) + "\n" + "\n".join(found) + "\n")

    for context in contexts:
        fits = not model.info.max_context or context <= model.info.max_context
        run_model = model if fits else random_weights_like(model, context)
        backend = None
        eager_tokens = {}
        for mode in modes:
            original = None
            # the original first, before the backend's hooks exist: transformers' own SDPA and cache, nothing of ours
            for name in sorted(names, key=lambda name: name != "original"):
                if name != "original" and backend is None:
                    backend = make_backend("native", run_model)
                edits = architecture_edits(run_model, name)
                if mode == "graph" and not graph_capturable(run_model, edits):
                    print(f"{name}: no graph mode (its step reads tensors that grow or Python-side positions)", flush=True)
                    continue
                runner = backend if edits else None
                graph = mode == "graph"
                profile = out / f"profile-{context}-{name}.txt" if args.profile and not graph else None
                try:
                    measure_decoding(run_model, runner, edits, 64, 2, args.batch, graph=graph)  # warm-up: kernels compiled, allocator warm
                    measured = measure_decoding(run_model, runner, edits, context, args.new_tokens, args.batch, warmup=args.warmup,
                                                profile=profile, graph=graph)
                except (RuntimeError, AttnprobeError) as error:  # a capture that fails is a result too: recorded, the run goes on
                    if not graph:
                        raise
                    failures.append({"context": context, "architecture": name, "mode": mode, "error": f"{type(error).__name__}: {error}"[:2000]})
                    print(json.dumps(failures[-1]), flush=True)
                    save()
                    continue
                tokens = measured.pop("tokens")
                row = {"context": context, "architecture": name, "weights": "pretrained" if fits else "random",
                       "batch": args.batch, **measured}
                if mode == "eager":
                    eager_tokens[name] = tokens
                elif name in eager_tokens:
                    row["tokens_equal_eager"] = (tokens == eager_tokens[name]).float().mean().item()
                original = row if name == "original" else original
                row.update(ratios(row, original))
                rows.append(row)
                print(json.dumps(row), flush=True)
                stream.write(json.dumps(row) + "\n")
                stream.flush()
                save()
        if backend is not None:
            backend.close()
        del run_model, backend
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    stream.close()
    for line in goals(rows):
        print(line)
    return rows


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tiny", action="store_true", help="a tiny random GQA Llama instead of --model (CPU test)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps; the cache ends at the context length")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (the cache grows with it, a state too)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps at the context before the timed ones")
    parser.add_argument("--modes", default="eager", help="comma list of eager, graph (a CUDA graph per step; CPU: the "
                        "static step run eagerly)")
    parser.add_argument("--profile", action="store_true", help="write profile-CONTEXT-ARCH.txt: a torch.profiler table of "
                        "4 more decode steps and, on CUDA, the source lines that synchronised the host")
    parser.add_argument("--architectures", default=None, help=f"comma list (default: {','.join(default_architectures())})")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    started = time.time()
    run(parse())
    print(f"done in {time.time() - started:.0f} s")
