"""Peak memory and time of one float32 prefill SDPA call with grouped KV heads, side by side:
transformers' `enable_gqa` form against the KV heads repeated (`hooks.backends.native.expand_kv_heads`).

    python benchmarks/gqa_sdpa_memory.py --lengths 8192,16384,32704 --out results.json

Shapes default to Qwen2.5-Coder-0.5B's attention (14 query heads, 2 KV heads, head_dim 64). Needs CUDA:
that is where float32 grouped SDPA has only the math kernel.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def measure(form: str, length: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    torch.manual_seed(0)
    q = torch.randn(1, heads, length, head_dim, device="cuda")
    k, v = (torch.randn(1, kv_heads, length, head_dim, device="cuda") for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        if form == "enable_gqa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            group = heads // kv_heads
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"form": form, "length": length, "error": "out of memory"}
    row = {"form": form, "length": length, "ms": (time.perf_counter() - start) * 1e3,
           "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2 ** 30, "out": out}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,16384,32704")
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA: on CPU float32 grouped SDPA has kernels of its own")
        return 2
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        pair = [measure(form, length, args.heads, args.kv_heads, args.head_dim) for form in ("expanded", "enable_gqa")]
        outs = [row.pop("out", None) for row in pair]
        if all(o is not None for o in outs):
            pair[0]["max_abs_difference"] = float((outs[0] - outs[1]).abs().max())
        del outs
        torch.cuda.empty_cache()
        rows += pair
        for row in pair:
            print(json.dumps(row))
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                  open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
