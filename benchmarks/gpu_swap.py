"""Prefill of swapped SmolLM2 variants on one GPU: the Triton linear kernels against the torch path.

    python benchmarks/gpu_swap.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--lengths 2048 8192] --out swap.json

Every head is replaced by an unfitted kernel (timing does not depend on the fit). On CUDA, `swap`
runs a linear kernel's prefill through `kernels.triton_linear.chunked_linear_attention`; with
`kernels.dispatch.force_torch` the same edits run the chunked torch form. For each length it times
one prefill (no KV cache) of the original model and of each variant both ways, reports peak memory,
and checks that the two paths give the same logits.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gpu_census import timed
from gpu_bench import import_attnprobe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--kernels", nargs="+", default=["elu", "hedgehog"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("gpu_swap.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU")
        return 2
    import_attnprobe()
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model
    from attnprobe.hooks.swap import swap_edits
    from attnprobe.kernels import dispatch

    model = load_model(args.gguf, dtype=getattr(torch, args.dtype), device="cuda")
    backend = make_backend("native", model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n in args.lengths:
        ids = torch.randint(0, model.hf.config.vocab_size, (1, n), device="cuda", generator=gen)

        def prefill(edits):
            with backend.patched(edits), torch.no_grad():
                return model.hf(input_ids=ids, use_cache=False).logits.float()

        prefill([])  # warm up
        _, ms, mib = timed(lambda: prefill([]))
        rows.append({"T": n, "variant": "original", "path": "sdpa", "ms": ms, "peak_mib": mib})
        for kernel in args.kernels:
            edits = swap_edits(model, kernel)
            results = {}
            for path in ("triton", "torch"):
                dispatch.force_torch(path == "torch")
                try:
                    prefill(edits)  # compile / warm up
                    results[path], ms, mib = timed(lambda: prefill(edits))
                finally:
                    dispatch.force_torch(False)
                rows.append({"T": n, "variant": f"all-{kernel}", "path": path, "ms": ms, "peak_mib": mib})
            diff = float((results["triton"] - results["torch"]).abs().max() / results["torch"].abs().max())
            rows.append({"T": n, "variant": f"all-{kernel}", "path": "check: triton vs torch logits", "max_rel_error": diff})
    for row in rows:
        print(json.dumps(row))
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                    "dtype": args.dtype, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
