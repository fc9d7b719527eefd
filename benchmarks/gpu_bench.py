"""GPU benchmark of the Triton kernels (needs CUDA, torch and triton; flash-linear-attention optional).

    python benchmarks/gpu_bench.py --out bench.json [--dtypes bfloat16] [--sweep 32768] [--checks-only]

For T in 2K, 8K, 32K, head dim 64 and 128, bf16 and fp16 (B=1, H=8) it prints and writes as JSON:
  (a) attention statistics + SDPA forward against SDPA forward alone (goal: ratio <= 1.5): the census
      path (cuDNN's SDPA with its log-sum-exp, then our passes), and the variants with the log-sum-exp
      from our own pass or from FlashAttention-2's op, each part alone, and with --sweep the column
      pass under every launch in COLUMN_CONFIGS;
  (b) our chunked linear attention against fla's chunk_linear_attn (when importable) and SDPA;
  (c) the one-launch hybrid kernel (half sliding-window softmax, half linear heads) against its two
      parts launched separately;
  (d) peak memory above the inputs of every call (torch.cuda.max_memory_allocated).
It first checks each kernel against its torch reference on the GPU. Every measurement is guarded,
so one failure is recorded and the run goes on; it stops starting new shapes after --budget seconds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"


def import_attnprobe() -> None:
    """Make `attnprobe` importable from this checkout's src/ when the package is not installed."""
    try:
        import attnprobe.kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))


def time_ms(fn, warmup: int = 3, repeats: int = 10) -> float:
    """Median CUDA-event time of `fn` in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if sum(times) > 2000:  # long calls: a few repeats are enough
            break
    return statistics.median(times)


def peak_mib(fn) -> float:
    """Memory allocated by one call above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2 ** 20


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.errors: list[dict] = []

    def measure(self, section: str, name: str, fn, **shape) -> float | None:
        try:
            ms = time_ms(fn)
            mib = peak_mib(fn)
        except Exception as exc:  # one broken measurement must not end the run
            self.errors.append({"section": section, "name": name, **shape, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"  [{section}] {name:<34} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
            torch.cuda.empty_cache()
            return None
        self.rows.append({"section": section, "name": name, **shape, "ms": ms, "peak_mib": mib})
        print(f"  [{section}] {name:<34} {ms:9.3f} ms   peak {mib:9.1f} MiB")
        return ms

    def ratio(self, section: str, name: str, numerator: float | None, denominator: float | None, **shape) -> None:
        if numerator is None or denominator is None:
            return
        value = numerator / denominator
        self.rows.append({"section": section, "name": name, **shape, "ratio": value})
        print(f"  [{section}] {name:<34} {value:9.2f} x")


def flash_with_lse(q, k, v, scaling):
    """SDPA's flash forward, which also returns the row log-sum-exp (B, H, T) in natural log."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scaling)
    return out[0], out[1]


def load_fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:
        print("fla not available")
        return None
    return chunk_linear_attn


def fla_call(chunk_linear_attn, phi_q, phi_k, v):
    """fla takes (B, T, H, K); older releases defaulted to head-first and took a `head_first` flag."""
    q, k, vv = (x.transpose(1, 2).contiguous() for x in (phi_q, phi_k, v))
    try:
        chunk_linear_attn(q, k, vv, scale=1.0, normalize=True, head_first=False)
        return lambda: chunk_linear_attn(q, k, vv, scale=1.0, normalize=True, head_first=False)
    except TypeError:
        return lambda: chunk_linear_attn(q, k, vv, scale=1.0, normalize=True)


def check_against_references(rec: Recorder, dtype, dim: int, n: int = 1000) -> None:
    """Kernel vs torch reference on the GPU at a length that is not a multiple of any block."""
    from attnprobe.kernels import attention_stats as ref
    from attnprobe.kernels import triton_linear as lin
    from attnprobe.kernels import triton_stats as st

    heads = 4
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device=DEVICE, generator=gen).to(dtype) for _ in range(3))
    scaling = dim ** -0.5
    checks = {}
    try:
        got = st.attention_stats(q, k, scaling, diagonals=(1,), argmax_rows=[n - 1])
        want = ref.reference_stats(q, k, scaling, diagonals=(1,), argmax_rows=[n - 1])
        checks["stats_lse"] = (got.lse - want.lse).abs().max().item()
        checks["stats_column_sum_rel"] = ((got.column_sum - want.column_sum).abs().max() / want.column_sum.abs().max()).item()
        checks["stats_row_sums_minus_1"] = (got.column_sum.sum(-1) / n - 1).abs().max().item()
        got_w = st.attention_stats(q, k, scaling, window=128)
        want_w = ref.reference_stats(q, k, scaling, window=128)
        checks["stats_window_column_sum_rel"] = ((got_w.column_sum - want_w.column_sum).abs().max() / want_w.column_sum.abs().max()).item()
        _, flash_lse = flash_with_lse(q, k, v, scaling)
        checks["flash_lse_vs_reference"] = (flash_lse.float() - want.lse).abs().max().item()
        fused = st.sdpa_with_lse(q, k, v, scaling)
        print(f"  [check] fused op chosen: {st._fused_choice}")
        checks["sdpa_with_lse_vs_reference"] = (fused[1] - want.lse).abs().max().item()
        checks["sdpa_with_lse_output_vs_sdpa"] = (fused[0].float() - F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).float()).abs().max().item()
        phi_q, phi_k = F.elu(q.float()).add(1).to(dtype), F.elu(k.float()).add(1).to(dtype)
        z = lin.chunked_linear_attention(phi_q, phi_k, v)
        checks["linear_chunked"] = (z.float() - lin.linear_attention_reference(phi_q, phi_k, v).float()).abs().max().item()
        for label, modes in (("mixed", [0, 1] * (heads // 2)), ("softmax", [0] * heads), ("linear", [1] * heads)):
            slots = [h for h, m in enumerate(modes) if m == 1]
            hq, hk = phi_q[:, slots], phi_k[:, slots]
            for window in (128, None):
                h = lin.hybrid_attention(q, k, v, hq, hk, modes, scaling, window)
                want = lin.hybrid_reference(q, k, v, hq, hk, modes, scaling, window).float()
                checks[f"hybrid_{label}_w{window}"] = (h.float() - want).abs().max().item()
        state = torch.zeros(1, heads, dim, dim, device=DEVICE)
        norm = torch.zeros(1, heads, dim, device=DEVICE)
        steps = torch.stack([lin.linear_decode_step(phi_q[:, :, t], phi_k[:, :, t], v[:, :, t], state, norm) for t in range(8)], 2)
        checks["decode_steps"] = (steps.float() - lin.linear_attention_reference(phi_q[:, :, :8], phi_k[:, :, :8], v[:, :, :8]).float()).abs().max().item()
    except Exception as exc:
        rec.errors.append({"section": "check", "dim": dim, "dtype": str(dtype), "error": traceback.format_exc()[-1500:]})
        print(f"  [check] FAILED: {type(exc).__name__}: {exc}")
    for name, value in checks.items():
        rec.rows.append({"section": "check", "name": name, "dim": dim, "dtype": str(dtype), "max_error": value})
        print(f"  [check] {name:<34} max error {value:.2e}")


# launch configurations of the column-sum pass tried by --sweep (BLOCK_N keys per program, BLOCK_M queries per step)
COLUMN_CONFIGS = [dict(BLOCK_N=bn, BLOCK_M=bm, num_warps=w, num_stages=st) for bn, bm, w, st in [
    (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
    (64, 128, 4, 3), (128, 64, 4, 4), (128, 64, 8, 2), (256, 64, 8, 3), (64, 32, 4, 2)]]


def bench_shape(rec: Recorder, fla, n: int, dim: int, dtype, heads: int, window: int, sweep_lengths=()) -> None:
    from attnprobe.kernels import triton_linear as lin
    from attnprobe.kernels import triton_stats as st

    shape = {"T": n, "dim": dim, "dtype": str(dtype).replace("torch.", ""), "B": 1, "H": heads}
    print(f"T={n} d={dim} {shape['dtype']} H={heads}")
    gen = torch.Generator(device=DEVICE).manual_seed(n + dim)
    q, k, v = (torch.randn(1, heads, n, dim, device=DEVICE, generator=gen).to(dtype) for _ in range(3))
    scaling = dim ** -0.5

    # (a) statistics beside the forward pass
    sdpa = rec.measure("a", "sdpa_forward", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling), **shape)
    stats_kwargs = {"diagonals": (1,), "argmax_rows": [n - 1]}

    def sdpa_then_stats():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
        return out, st.attention_stats(q, k, scaling, **stats_kwargs)

    def flash_then_stats():
        out, lse = flash_with_lse(q, k, v, scaling)
        return out, st.attention_stats(q, k, scaling, lse=lse, **stats_kwargs)

    def census_path():  # what the native backend runs for a PatternStats read on CUDA
        out, lse = st.sdpa_with_lse(q, k, v, scaling)
        return out, st.pattern_statistics(q, k, scaling, lse=lse, diagonals=(1,)), st.last_rows_argmax(q, k, scaling, [n - 1])

    census = rec.measure("a", "census path: sdpa(lse)+stats", census_path, **shape)
    rec.measure("a", "cudnn(lse) alone", lambda: st._fused_call("cudnn", q, k, v, scaling), **shape)
    rec.ratio("a", "ratio census path / sdpa", census, sdpa, **shape)
    own = rec.measure("a", "sdpa+stats(own lse)", sdpa_then_stats, **shape)
    given = rec.measure("a", "flash(lse)+stats(given lse)", flash_then_stats, **shape)
    rec.measure("a", "stats alone (own lse)", lambda: st.attention_stats(q, k, scaling, **stats_kwargs), **shape)
    _, flash_lse = flash_with_lse(q, k, v, scaling)
    rec.measure("a", "flash(lse) alone", lambda: flash_with_lse(q, k, v, scaling), **shape)
    rec.measure("a", "lse pass alone", lambda: st.triton_lse(q, k, scaling), **shape)
    rec.measure("a", "column sums alone", lambda: st.triton_column_sums(q, k, flash_lse, scaling), **shape)
    rec.measure("a", "entries + argmax alone", lambda: (st.triton_entries(q, k, flash_lse, scaling, [(0, 0), (-1, 1)]),
                                                       st.last_rows_argmax(q, k, scaling, [n - 1])), **shape)
    if n in sweep_lengths:
        for config in COLUMN_CONFIGS:
            label = "column sums BN{BLOCK_N} BM{BLOCK_M} w{num_warps} s{num_stages}".format(**config)
            rec.measure("sweep", label, lambda: st.triton_column_sums(q, k, flash_lse, scaling, config=config), **shape)
    rec.ratio("a", "ratio sdpa+stats / sdpa", own, sdpa, **shape)
    rec.ratio("a", "ratio flash(lse)+stats / sdpa", given, sdpa, **shape)

    # (b) linear attention, feature map applied beforehand
    phi_q, phi_k = F.elu(q.float()).add(1).to(dtype), F.elu(k.float()).add(1).to(dtype)
    ours = rec.measure("b", "triton chunked linear", lambda: lin.chunked_linear_attention(phi_q, phi_k, v), **shape)
    if fla is not None:
        try:
            fla_ms = rec.measure("b", "fla chunk_linear_attn", fla_call(fla, phi_q, phi_k, v), **shape)
            rec.ratio("b", "ratio ours / fla", ours, fla_ms, **shape)
        except Exception as exc:
            rec.errors.append({"section": "b", "name": "fla", **shape, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"  [b] fla chunk_linear_attn FAILED: {type(exc).__name__}: {exc}")
    rec.ratio("b", "ratio ours / sdpa", ours, sdpa, **shape)

    # (c) hybrid layer: even heads sliding-window softmax, odd heads linear
    modes = [0, 1] * (heads // 2)
    soft, linear_heads = slice(0, heads, 2), slice(1, heads, 2)
    hq, hk = phi_q[:, linear_heads].contiguous(), phi_k[:, linear_heads].contiguous()
    sq, sk, sv = (x[:, soft].contiguous() for x in (q, k, v))
    lv = v[:, linear_heads].contiguous()
    empty = hq[:, :0]
    one = rec.measure("c", f"hybrid one launch (w={window})", lambda: lin.hybrid_attention(q, k, v, hq, hk, modes, scaling, window), **shape)

    def two_parts():
        a = lin.hybrid_attention(sq, sk, sv, empty, empty, [0] * sq.shape[1], scaling, window)
        b = lin.chunked_linear_attention(hq, hk, lv)
        return a, b

    parts = rec.measure("c", "window softmax + linear, separate", two_parts, **shape)
    rec.measure("c", "  window softmax heads alone", lambda: lin.hybrid_attention(sq, sk, sv, empty, empty, [0] * sq.shape[1], scaling, window), **shape)
    rec.measure("c", "  linear heads alone (one launch)", lambda: lin.hybrid_attention(
        sq, sk, lv, hq, hk, [1] * hq.shape[1], scaling, window), **shape)
    rec.ratio("c", "ratio one launch / separate", one, parts, **shape)
    rec.ratio("c", "ratio one launch / sdpa (all heads)", one, sdpa, **shape)
    del q, k, v, phi_q, phi_k, hq, hk, sq, sk, sv, lv
    torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"), help="JSON file to write")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--window", type=int, default=512, help="sliding window of the hybrid's softmax heads")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds after which no new shape is started")
    parser.add_argument("--sweep", type=int, nargs="*", default=[], help="lengths at which to time every COLUMN_CONFIGS launch of the column-sum pass")
    parser.add_argument("--checks-only", action="store_true", help="run the correctness checks and stop")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 2
    import_attnprobe()
    import triton

    started = time.time()
    rec = Recorder()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(info))
    fla = load_fla()
    info["fla"] = fla is not None
    dtypes = [getattr(torch, name) for name in args.dtypes]
    for dim in args.dims:
        for dtype in dtypes:
            print(f"check d={dim} {dtype}")
            check_against_references(rec, dtype, dim)
    skipped = []
    for n in ([] if args.checks_only else sorted(args.lengths)):
        for dim in args.dims:
            for dtype in dtypes:
                if time.time() - started > args.budget:
                    skipped.append({"T": n, "dim": dim, "dtype": str(dtype)})
                    continue
                try:
                    bench_shape(rec, fla, n, dim, dtype, args.heads, args.window,
                                sweep_lengths=args.sweep if dtype == dtypes[0] else ())
                except Exception as exc:
                    rec.errors.append({"section": "shape", "T": n, "dim": dim, "dtype": str(dtype), "error": traceback.format_exc()[-1500:]})
                    print(f"  shape FAILED: {type(exc).__name__}: {exc}")
                    torch.cuda.empty_cache()
    if skipped:
        print(f"budget of {args.budget:.0f} s spent: skipped {skipped}")
    info["wall_s"] = time.time() - started
    report = {**info, "results": rec.rows, "errors": rec.errors, "skipped": skipped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({len(rec.rows)} rows, {len(rec.errors)} errors) in {info['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
