"""The gated and delta-rule families on one GPU: flash-linear-attention's Triton prefill against our torch
reference (parity) and against SDPA (time), on SmolLM2-shaped heads (9 query heads over 3 KV heads, d = 64).

    python benchmarks/gpu_families.py --out runs/gpu_families [--lengths 2048 8192 32768] [--families gla decay ...]

For each family (unfitted kernels with their parameters moved off the init, so every gate and beta
varies): parity at `--parity-length` (2,048) of the fla path (fp32 and bf16 inputs) against our chunked
torch form in fp32 on the same GPU (max abs error of z), the relative error of fla's input gradients in
bf16 (`kernels.fla.backward_error`: what decides whether a conversion trains through fla), then the prefill time of the fla path in bf16 at
each length, beside SDPA's causal attention on the same q, k, v and, up to `--torch-up-to`, our torch
chunked form. Results go to OUT/gpu_families.json and OUT/gpu_families.md after every measurement.
On a machine where fla cannot run (no CUDA, no fla-core) the fla columns say so and the rest still runs,
so `--device cpu --lengths 128` checks the script itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import import_attnprobe  # noqa: E402

FAMILIES = ("gla", "decay", "deltanet", "gated-deltanet", "kda")
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def inputs(length: int, device, dtype, seed: int = 0):
    """q (1, 9, T, 64) and k, v of 3 KV heads repeated to 9, as a swapped SmolLM2 layer hands them over."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, HEADS, length, HEAD_DIM, generator=generator)
    k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator).repeat_interleave(HEADS // KV_HEADS, dim=1)
            for _ in range(2))
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def kernel_for(name: str, device):
    from attnprobe.kernels.registry import make_kernel

    kernel = make_kernel(name, HEADS, HEAD_DIM)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in kernel.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return kernel.to(device)


def timed_ms(fn, device, repeats: int = 3) -> float:
    """Median milliseconds of `repeats` calls after one warm-up call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def measured(fn):
    """fn(), or the error it raised as text: one family's failure (an fla op refusing a shape or dtype, memory)
    is recorded in its cell and the rest of the benchmark still runs."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded, not hidden
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"


def markdown(results: dict) -> str:
    lines = ["## Parity: fla's Triton prefill vs our torch chunked form (fp32 reference), max abs error of z", "",
             "| family | T | fla fp32 | fla bf16 | backward bf16 (relative, T = 256) |", "|---|---|---|---|---|"]
    for row in results["parity"]:
        lines.append(f"| {row['family']} | {row['length']:,} | {_cell(row['fp32'])} | {_cell(row['bf16'])} | {_cell(row.get('backward'))} |")
    lines += ["", "## Prefill time, ms (1 x 9 heads x T x 64, bf16; median of 3)", "",
              "| family | T | fla | our torch | SDPA |", "|---|---|---|---|---|"]
    for row in results["timing"]:
        lines.append(f"| {row['family']} | {row['length']:,} | {_cell(row['fla_ms'])} | {_cell(row['torch_ms'])} | {_cell(row['sdpa_ms'])} |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if value is not None else "-"


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_families.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_families.md").write_text(markdown(results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--parity-length", type=int, default=2048)
    parser.add_argument("--torch-up-to", type=int, default=8192, help="time our torch chunked form up to this length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    import_attnprobe()
    from attnprobe.kernels import dispatch, fla

    device = torch.device(args.device)
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    probe = torch.empty(0, device=device)
    fla_here = dispatch.use_fla(probe)
    why = "fla not usable here (needs CUDA and fla-core)"
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "fla": fla_here, "parity": [], "timing": []}

    def prefill(kernel, q, k, v, torch_path: bool):
        dispatch.force_torch(torch_path)
        try:
            with torch.no_grad():
                return kernel.prefill(q, k, v, HEAD_DIM ** -0.5)[0]
        finally:
            dispatch.force_torch(False)

    started = time.perf_counter()
    for name in args.families:  # each step announced first: fla compiles its kernels on first use, for minutes
        print(f"[{time.perf_counter() - started:6.1f} s] parity of {name} at {args.parity_length}", flush=True)
        kernel = kernel_for(name, device)
        q, k, v = inputs(args.parity_length, device, torch.float32)
        reference = prefill(kernel, q, k, v, torch_path=True).float()
        row = {"family": name, "length": args.parity_length, "fp32": why, "bf16": why, "backward": why}
        if fla_here:
            # a family whose fla op refuses fp32 (the plain delta rule) runs our own form there: say so, do not compare
            row["fp32"] = measured(lambda: float((prefill(kernel, q, k, v, False).float() - reference).abs().max())
                                   if kernel.fla_prefills(q) else "our form (fla: bf16 only)")
            row["bf16"] = measured(lambda: float((prefill(kernel, *(x.to(half) for x in (q, k, v)), False).float()
                                                  - reference).abs().max()))
            row["backward"] = measured(lambda: fla.backward_error(kernel, device, half))  # inf: fla refused it
        results["parity"].append(row)
        write(args.out, results)
        print(row, flush=True)

    for length in args.lengths:
        q, k, v = inputs(length, device, half)
        sdpa = measured(lambda: timed_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                                         device))
        for name in args.families:
            print(f"[{time.perf_counter() - started:6.1f} s] prefill time of {name} at {length}", flush=True)
            kernel = kernel_for(name, device)
            row = {"family": name, "length": length, "sdpa_ms": sdpa,
                   "fla_ms": measured(lambda f=kernel: timed_ms(lambda: prefill(f, q, k, v, False), device)) if fla_here else why,
                   "torch_ms": measured(lambda f=kernel: timed_ms(lambda: prefill(f, q, k, v, True), device, repeats=1))
                   if length <= args.torch_up_to else None}
            results["timing"].append(row)
            write(args.out, results)
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
