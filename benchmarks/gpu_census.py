"""Per-layer attention statistics of a SmolLM2-shaped model at long context on one GPU.

    python benchmarks/gpu_census.py --out census.json [--gguf PATH] [--lengths 8192 32768]

Builds SmolLM2-135M's shape with random weights (or loads `--gguf PATH`), then for each length runs
the decoder once through the native backend with a PatternStats read on every layer (what the census
runs: column sums, previous-token diagonal, last-row argmax), computed on CUDA by SDPA's flash kernel and
the Triton statistics kernels, and with --torch-path-max also by the chunked torch softmax. It reports time and peak memory against a plain
SDPA forward and against eager attention with `output_attentions=True` at the largest length eager
manages (2K, 4K, 8K tried; out-of-memory is caught), and checks the kernel's column sums against the
eager pattern there. Prints a table and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from gpu_bench import import_attnprobe

SMOLLM2_SHAPE = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                     intermediate_size=1536, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                     max_position_embeddings=32768, tie_word_embeddings=True)


class StubTokenizer:
    """All `describe` needs from a tokenizer when the weights are random."""

    bos_token_id = 1

    def __call__(self, text):
        return SimpleNamespace(input_ids=[self.bos_token_id] + [2] * len(text))


def build_model(gguf: str | None, dtype):
    from attnprobe.hooks.model import Model, describe, load_model

    if gguf:
        return load_model(gguf, dtype=dtype, device="cuda")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2_SHAPE)
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config).to(device="cuda", dtype=dtype).eval().requires_grad_(False)
    tokenizer = StubTokenizer()
    return Model(hf, tokenizer, describe(hf, tokenizer, "smollm2-shape-random", "none", "random weights"))


def timed(fn):
    """(result, milliseconds, peak MiB above the memory in use before the call)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, (time.perf_counter() - start) * 1000, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def run_census(model, backend, ids, torch_path: bool = False):
    """The census's statistics pass: a PatternStats read on every layer, as the sinks and prose stages run it.

    On CUDA the native backend computes it with SDPA's flash kernel (output + log-sum-exp) and the Triton
    statistics kernels; `torch_path` forces the chunked torch softmax instead."""
    from attnprobe.hooks.reducers import PatternStats
    from attnprobe.hooks.sites import Site
    from attnprobe.kernels import dispatch

    reads = {(layer, Site.PATTERN): PatternStats(diagonals=(1,), track_argmax=True) for layer in range(model.info.n_layers)}
    dispatch.force_torch(torch_path)
    try:
        with backend.patched([], reads), torch.no_grad():
            model.hf.model(input_ids=ids, use_cache=False)
    finally:
        dispatch.force_torch(False)
    return {layer: {"column_sum": reads[(layer, Site.PATTERN)].column_sum[0],  # (H, S)
                    "diag_1": reads[(layer, Site.PATTERN)].diagonal(1)[0].tolist(),
                    "last_row_argmax": reads[(layer, Site.PATTERN)].argmax_steps[0][0].tolist()}
            for layer in range(model.info.n_layers)}


def set_attention(model, name: str) -> None:
    for module in model.hf.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


def eager_column_sums(model, ids):
    set_attention(model, "eager")
    try:
        with torch.no_grad():
            out = model.hf.model(input_ids=ids, use_cache=False, output_attentions=True)
        return [a[0].float().sum(dim=1).cpu() for a in out.attentions]  # per layer (H, S)
    finally:
        set_attention(model, "sdpa")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_census.json"))
    parser.add_argument("--gguf", default=None, help="real SmolLM2 weights (.gguf); default: random weights")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--eager-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--torch-path-max", type=int, default=8192, help="longest T at which the chunked torch path is timed too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this census benchmark needs a GPU")
        return 2
    import_attnprobe()
    from attnprobe.hooks.backends.native import NativeBackend

    dtype = getattr(torch, args.dtype)
    started = time.time()
    model = build_model(args.gguf, dtype)
    info = model.info
    print(f"model {info.model_id}: {info.n_layers} layers x {info.n_heads} heads ({info.n_kv_heads} KV), d={info.head_dim}, {args.dtype}")
    vocab = model.hf.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, errors, layers_out, kernel_columns, inputs = [], [], {}, {}, {}

    def record(mode, n, fn):
        try:
            result, ms, mib = timed(fn)
        except torch.cuda.OutOfMemoryError:
            rows.append({"mode": mode, "T": n, "error": "out of memory"})
            print(f"{mode:<32} T={n:>6}  out of memory")
            torch.cuda.empty_cache()
            return None
        except Exception as exc:
            errors.append({"mode": mode, "T": n, "error": traceback.format_exc()[-1500:]})
            rows.append({"mode": mode, "T": n, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{mode:<32} T={n:>6}  FAILED {type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
            return None
        rows.append({"mode": mode, "T": n, "ms": ms, "peak_mib": mib})
        print(f"{mode:<32} T={n:>6}  {ms:10.1f} ms  peak {mib:10.1f} MiB")
        return result

    def ids_of(n):
        return torch.randint(0, vocab, (1, n), device="cuda", generator=gen)

    backend = NativeBackend(model)
    try:
        warm = ids_of(1024)  # compiles the kernels and warms the allocator outside the timings
        run_census(model, backend, warm)
        with torch.no_grad():
            model.hf.model(input_ids=warm, use_cache=False)
        for n in sorted(set(args.lengths + args.eager_lengths)):
            ids = inputs[n] = ids_of(n)
            with torch.no_grad():
                record("sdpa forward (no reads)", n, lambda: model.hf.model(input_ids=ids, use_cache=False))
            per_layer = record("census (triton stats)", n, lambda: run_census(model, backend, ids))
            if n <= args.torch_path_max:
                chunked = record("census (chunked torch)", n, lambda: run_census(model, backend, ids, torch_path=True))
                if per_layer is not None and chunked is not None:
                    diff = max(float((per_layer[l]["column_sum"] - chunked[l]["column_sum"]).abs().max()
                                     / chunked[l]["column_sum"].abs().max()) for l in range(info.n_layers))
                    rows.append({"mode": "check: triton vs chunked torch column sums", "T": n, "max_rel_error": diff})
                    print(f"{'check: triton vs chunked columns':<32} T={n:>6}  max relative error {diff:.2e}")
            if per_layer is not None:
                kernel_columns[n] = [per_layer[layer]["column_sum"] for layer in range(info.n_layers)]
                layers_out[str(n)] = [{"layer": layer, "alpha_0": (per_layer[layer]["column_sum"][:, 0] / n).tolist(),
                                       **{key: value for key, value in per_layer[layer].items() if key != "column_sum"}}
                                      for layer in range(info.n_layers)]
    finally:
        backend.close()

    eager_done = None
    for n in sorted(args.eager_lengths):
        ids = inputs[n]  # the very inputs the census saw, so the columns can be compared
        columns = record("eager output_attentions", n, lambda: eager_column_sums(model, ids))
        if columns is None:
            break
        eager_done = n
        if n in kernel_columns:
            diff = max(float((c - e).abs().max() / e.abs().max()) for c, e in zip(kernel_columns[n], columns))
            rows.append({"mode": "check: census vs eager column sums", "T": n, "max_rel_error": diff})
            print(f"{'check: census vs eager columns':<32} T={n:>6}  max relative error {diff:.2e}")
        del columns
        torch.cuda.empty_cache()

    print(f"\nlargest eager length: {eager_done}")
    print(f"{'mode':<32} {'T':>6} {'ms':>10} {'peak MiB':>10}")
    for row in rows:
        if "ms" in row:
            print(f"{row['mode']:<32} {row['T']:>6} {row['ms']:>10.1f} {row['peak_mib']:>10.1f}")
    report = {"model": info.to_dict(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": args.dtype, "largest_eager_length": eager_done, "rows": rows, "errors": errors,
              "per_layer": layers_out, "wall_s": time.time() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
