"""What a replacement really saves: decode and prefill of each architecture beside the original and beside a
bandwidth-bound softmax baseline, every step against its own memory bound.

    # GPU (issue 44): SmolLM2's shape, 8K and 32K at batch 1, 8, 32; rows written to $OUT as they finish
    python benchmarks/decode_bench.py --device cuda --dtype bfloat16 --contexts 8192,32768 --batches 1,8,32 \\
        --modes graph,eager --out $OUT/smollm2
    python benchmarks/decode_bench.py --device cuda --dtype bfloat16 --contexts 131072 --batches 1 --out $OUT/smollm2-128k
    python benchmarks/decode_bench.py --model Qwen/Qwen2.5-0.5B --device cuda --dtype bfloat16 ... --out $OUT/qwen
    # CPU, small: a tiny random GQA Llama (what the test runs)
    python benchmarks/decode_bench.py --tiny --contexts 64,128 --new-tokens 8 --out /tmp/decode_bench

Architectures (--architectures; fresh kernels: the cost does not depend on fitted parameters):
    original            transformers' SDPA decode (graph mode: over a StaticCache with its mask)
    original-split-k    the strong baseline: the same model, its softmax decode step the split-K (flash-decoding)
                        Triton kernel of kernels/softmax/decode.py over the StaticCache (graph mode only)
    all-KERNEL          every head KERNEL (all-gated-deltanet, all-kda, all-hedgehog, ...)
    sink+window+gdn     every head sink + window softmax mixed with Gated DeltaNet (any catalogue hybrid)
    layers-1of4-softmax-gdn   1 of every 4 layers softmax, the rest Gated DeltaNet (analyses/experiments/architectures)
    heads-P-KERNEL      P % of the KV heads exact softmax (whole GQA groups, KV head 0 of every layer first),
                        the other heads KERNEL: heads-12.5-gated-deltanet, heads-25-sink+window
Each measurement (analyses/efficiency/decoding.py) prefills `context - new_tokens - warmup` random tokens,
decodes `warmup` untimed and `new_tokens` timed (CUDA events), so the cache ends at the context.

Modes (--modes): `eager` launches every step's kernels from Python; `graph` captures one step as a CUDA graph
after the warm-up and replays it (hooks/cache.py StaticStep), so a step costs its GPU work alone. Steps at
fixed addresses qualify: the original, fixed-state kernels, softmax heads and layers over a static cache,
sink + window rings once full (their slot on the device); a window with a linear part and sliding layers are
left out of that mode. On CPU `graph` runs the same static step eagerly. The original's static step prefills with SDPA causal
over its own keys (hooks/decode_attention.py): FlashAttention-class, no mask over the whole buffer.

Columns: cache bytes at the end, `step_bytes` (analyses/efficiency/bandwidth.py: weights + keys and values +
states read, recurrent states written), decode tokens/s over the batch, `step_ms`, `bound_ms` (the bytes at
the HBM peak: H200 4.8 TB/s, H100 3.35 TB/s, else --hbm-peak), `hbm_share` = bound / step, prefill ms, peak
memory; ratios to the original of the same mode and (`_vs_split_k`) to the split-K baseline's graph row of
the same context and batch (list graph first in --modes for the eager rows to get them).
A context beyond the model's window runs on random weights in the model's shape (same config, longer
position range): a forward's cost does not depend on the weights; rows record `weights: random`.
Bad input (a batch that does not fit the GPU, a context shorter than the steps) prints one line naming the
fix and exits 2, before any measurement.
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

from attnprobe.analyses.efficiency.bandwidth import bound_columns, hbm_peak
from attnprobe.analyses.efficiency.decoding import measure_decoding
from attnprobe.analyses.experiments.architectures import catalogue, variant_edits
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import make_backend
from attnprobe.hooks.cache import graph_capturable
from attnprobe.hooks.model import DEFAULT_MODEL, Model, describe, load_model
from attnprobe.io import atomic_write_text
from attnprobe.kernels.hybrid.ring import ring_part

DEFAULT_ARCHITECTURES = ("original", "original-split-k", "all-gated-deltanet", "all-kda", "sink+window+gdn",
                         "heads-12.5-gated-deltanet", "layers-1of4-softmax-gdn")
BASELINES = {"original": "sdpa", "original-split-k": "split-k"}  # name -> the original's decode attention


def exact_heads(model: Model, share: float) -> dict[int, list[int]]:
    """`share` of the KV heads (rounded to whole ones) with every query head of their group, KV head 0 of every
    layer first, then 1, ...: the fewest KV heads keep a cache."""
    info = model.info
    group = info.n_heads // info.n_kv_heads
    wanted = round(share * info.n_layers * info.n_kv_heads)
    chosen: dict[int, list[int]] = {}
    for index in range(wanted):
        kv, layer = divmod(index, info.n_layers)
        chosen.setdefault(layer, []).extend(range(kv * group, (kv + 1) * group))
    return chosen


def architecture_edits(model: Model, name: str) -> list:
    if name in BASELINES:
        return []
    if name.startswith("heads-"):
        share, _, kernel = name[len("heads-"):].partition("-")
        exact = exact_heads(model, float(share) / 100)
        return variant_edits(model, kernel, {(layer, h) for layer, heads in exact.items() for h in heads})
    variant = catalogue(model).get(name)
    if variant is None or variant.kernel is None:
        known = [n for n, v in catalogue(model).items() if v.kernel and not n.startswith("keep-")]
        raise AttnprobeError(f"unknown architecture {name!r}: choose among original, original-split-k, heads-P-KERNEL, {', '.join(known)}")
    return variant_edits(model, variant.kernel, variant.keep(model, None))


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


def shape_model(shape: str, device: str, dtype: torch.dtype) -> Model:
    """Random weights in a named model's shape (convert_bench.SHAPES): a step's cost does not depend on the
    weights, and nothing has to be carried to a GPU machine."""
    from convert_bench import SHAPES
    from transformers import AutoModelForCausalLM

    if shape not in SHAPES:
        raise AttnprobeError(f"unknown --shape {shape!r}: choose among {', '.join(SHAPES)}")
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(SHAPES[shape]()).to(dtype=dtype).eval()
    return Model(hf, ByteTokenizer(), describe(hf, ByteTokenizer(), f"{shape} shape", "none", "random"))


def random_weights_like(model: Model, positions: int) -> Model:
    """The model's architecture with random weights and a position range of `positions`."""
    config = type(model.hf.config).from_dict(model.hf.config.to_dict())
    config.max_position_embeddings = positions
    torch.manual_seed(0)
    param = next(model.hf.parameters())
    with torch.device(param.device):
        hf = type(model.hf)(config).to(dtype=param.dtype).eval()
    return Model(hf, model.tokenizer, describe(hf, model.tokenizer, f"{model.info.model_id} (random weights)", "none", "random"))


def needed_bytes(model: Model, context: int, batch: int) -> int:
    """What the original needs at (context, batch): weights, its whole KV cache twice (an eager step's
    DynamicLayer concatenates a new copy while the old one lives), and the prefill's largest activations
    (the MLP's three intermediate tensors and the residual stream's few, in the model's dtype)."""
    info, config = model.info, model.hf.config
    element = next(model.hf.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    cache = batch * context * info.n_layers * info.n_kv_heads * info.head_dim * 2 * element
    activations = batch * context * (3 * config.intermediate_size + 6 * config.hidden_size) * element
    return weights + 2 * cache + activations


def check_fits(model: Model, contexts: list[int], batches: list[int], new_tokens: int, warmup: int, free: int | None) -> None:
    """Every (context, batch) leaves a prompt and fits the `free` bytes of the GPU (None: not on a GPU)."""
    for context in contexts:
        if context <= new_tokens + warmup:
            raise AttnprobeError(f"a context of {context} leaves no prompt before {warmup} + {new_tokens} steps: "
                                 "lower --new-tokens or raise --contexts")
    if free is None:
        return
    for context in contexts:
        for batch in batches:
            need = needed_bytes(model, context, batch)
            if need > 0.9 * free:
                raise AttnprobeError(f"batch {batch} at {context} tokens needs about {need / 1e9:.1f} GB, the GPU has "
                                     f"{free / 1e9:.1f} GB free: run it without that batch (--batches) or context (--contexts)")


def ratios(row: dict, reference: dict | None, suffix: str) -> dict:
    if reference is None:
        return {}
    safe = lambda a, b: a / b if b else math.nan  # noqa: E731
    return {f"cache_ratio{suffix}": safe(row["kv_cache_bytes_measured"], reference["kv_cache_bytes_measured"]),
            f"decode_speedup{suffix}": safe(row["decode_tokens_per_s"], reference["decode_tokens_per_s"]),
            f"prefill_ratio{suffix}": safe(row["prefill_ms"], reference["prefill_ms"]),
            f"peak_ratio{suffix}": safe(row["peak_memory_bytes"], reference["peak_memory_bytes"])}


COLUMNS = [("context", "{}"), ("batch", "{}"), ("decode_mode", "{}"), ("architecture", "{}"), ("weights", "{}"),
           ("kv_cache_bytes_measured", "{:.4g}"), ("step_bytes", "{:.4g}"), ("decode_tokens_per_s", "{:.1f}"),
           ("step_ms", "{:.3f}"), ("bound_ms", "{:.3f}"), ("hbm_share", "{:.3f}"), ("decode_speedup", "{:.2f}"),
           ("decode_speedup_vs_split_k", "{:.2f}"), ("cache_ratio", "{:.3f}"), ("prefill_ms", "{:.1f}"),
           ("prefill_ratio", "{:.2f}"), ("peak_memory_bytes", "{:.4g}")]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(form.format(row[name]) if name in row else "" for name, form in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def goals(rows: list[dict]) -> list[str]:
    """Issue 44's goals: the split-K baseline's step at 32K and batch 8 at >= 50 % of the HBM peak; every
    all- row's step within 3x of its own bound."""
    lines = []
    for row in rows:
        if "hbm_share" not in row:
            continue
        where = f"{row['architecture']} at {row['context']}, batch {row['batch']} ({row['decode_mode']})"
        if row["architecture"] == "original-split-k" and row["context"] == 32768 and row["batch"] == 8:
            lines.append(f"{where}: {row['hbm_share']:.0%} of HBM (goal >= 50%): {'met' if row['hbm_share'] >= 0.5 else 'NOT met'}")
        if row["architecture"].startswith("all-"):
            lines.append(f"{where}: {row['times_bound']:.2f}x its bound (goal <= 3x): {'met' if row['times_bound'] <= 3 else 'NOT met'}")
    return lines


class Record:
    """The run's rows, written as each finishes: decode_bench.jsonl (appended), .json and .md (rewritten)."""

    def __init__(self, out: Path, machine: dict):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.machine, self.rows = out, machine, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with (self.out / "decode_bench.jsonl").open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        found = goals(self.rows)
        atomic_write_text(self.out / "decode_bench.json", json.dumps({"machine": self.machine, "rows": self.rows, "goals": found}, indent=1))
        atomic_write_text(self.out / "decode_bench.md", f"{json.dumps(self.machine)}\n\n" + markdown(self.rows) + "\n" + "\n".join(found) + "\n")


def measure_row(model: Model, backend, name: str, mode: str, context: int, batch: int, args) -> tuple[dict, torch.Tensor] | None:
    """One architecture in one mode at (context, batch) and its greedy tokens, or None where the mode does not apply."""
    edits = architecture_edits(model, name)
    graph = mode == "graph"
    if (graph and not graph_capturable(model, edits)) or (name == "original-split-k" and not graph):
        return None
    steady = max([window.window + window.sinks for window in map(ring_part, (e.kernel for e in edits)) if window] or [0])
    if graph and context - args.new_tokens - args.warmup < steady:  # a ring replays once its window and sinks are full
        return None
    attention = BASELINES.get(name, "sdpa")
    runner = backend if edits else None
    warm = min(context, max(64, steady + 8))
    measure_decoding(model, runner, edits, warm, 2, batch, graph=graph, attention=attention)  # kernels compiled, allocator warm
    profile = Path(args.out) / f"profile-{context}-{batch}-{name}.txt" if args.profile and not graph else None
    measured = measure_decoding(model, runner, edits, context, args.new_tokens, batch, warmup=args.warmup, graph=graph,
                                attention=attention, profile=profile)
    tokens = measured.pop("tokens")
    return {"context": context, "batch": batch, "architecture": name, **measured}, tokens


def run(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        model = tiny_model(device, dtype)
    else:
        model = shape_model(args.shape, device, dtype) if args.shape else load_model(args.model, dtype=dtype, device=device)
    contexts, batches = [int(c) for c in args.contexts.split(",")], [int(b) for b in args.batches.split(",")]
    names, modes = args.architectures.split(","), args.modes.split(",")
    if set(modes) - {"eager", "graph"}:
        raise AttnprobeError(f"unknown decode modes {sorted(set(modes) - {'eager', 'graph'})}: choose among eager, graph")
    for name in names:
        architecture_edits(model, name)  # an unknown name fails before any measurement
    free = torch.cuda.mem_get_info(model.device)[0] if model.device.type == "cuda" else None
    check_fits(model, contexts, batches, args.new_tokens, args.warmup, free)
    name_of_device = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    peak = args.hbm_peak or hbm_peak(name_of_device)
    record = Record(Path(args.out), {"device": name_of_device, "hbm_peak": peak, "torch": torch.__version__,
                                     "dtype": args.dtype, "model": model.info.model_id, "new_tokens": args.new_tokens,
                                     "warmup": args.warmup, "command": " ".join(sys.argv)})
    for context in contexts:
        fits = not model.info.max_context or context <= model.info.max_context
        run_model = model if fits else random_weights_like(model, context)
        for batch in batches:
            strong = None  # the split-K baseline (graph mode), the reference of every mode's rows at this size
            for mode in modes:
                reference: dict[str, dict] = {}
                backend = None
                for name in sorted(names, key=lambda n: n not in BASELINES):  # the baselines first, before any hook
                    if name not in BASELINES and backend is None:
                        backend = make_backend("native", run_model)
                    measured = measure_row(run_model, backend, name, mode, context, batch, args)
                    if measured is None:
                        continue
                    row, tokens = measured
                    if name == "original":
                        original_tokens = tokens
                    elif name == "original-split-k" and "original" in reference:  # the baseline decodes what SDPA does
                        row["tokens_equal_original"] = (tokens == original_tokens).float().mean().item()
                    row["weights"] = "pretrained" if fits and not args.shape else "random"
                    row.update(bound_columns(row, peak))
                    reference.setdefault(name, row)
                    row.update(ratios(row, reference.get("original"), ""))
                    strong = row if name == "original-split-k" else strong
                    row.update(ratios(row, strong, "_vs_split_k"))
                    record.add(row)
                if backend is not None:
                    backend.close()  # the next baselines run on the model as it is
        del run_model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for line in goals(record.rows):
        print(line)
    return record.rows


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tiny", action="store_true", help="a tiny random GQA Llama instead of --model (CPU test)")
    parser.add_argument("--shape", default=None, help="random weights in a model's shape instead of --model: smollm2, qwen")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,8", help="comma list of sequences decoded together")
    parser.add_argument("--new-tokens", type=int, default=64, help="timed decode steps; the cache ends at the context length")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps at the context before the timed ones")
    parser.add_argument("--modes", default="graph,eager", help="comma list of eager, graph (a CUDA graph per step; CPU: "
                        "the static step run eagerly)")
    parser.add_argument("--hbm-peak", type=float, default=None, help="peak memory bandwidth in bytes/s (default: "
                        "from the GPU's name, H200 4.8e12, H100 3.35e12)")
    parser.add_argument("--profile", action="store_true", help="write profile-CONTEXT-BATCH-ARCH.txt for eager rows: a "
                        "torch.profiler table of 4 more steps and, on CUDA, the source lines that synchronised the host")
    parser.add_argument("--architectures", default=",".join(DEFAULT_ARCHITECTURES), help="comma list")
    parser.add_argument("--out", required=True, help="directory for decode_bench.json, .jsonl, .md (rows as they finish)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    started = time.time()
    try:
        run(parse())
    except AttnprobeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except torch.cuda.OutOfMemoryError:
        print("error: the GPU ran out of memory: run the rows that failed with a smaller --batches or --contexts", file=sys.stderr)
        sys.exit(2)
    print(f"done in {time.time() - started:.0f} s")
