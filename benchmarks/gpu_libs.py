"""Which well-kept GPU libraries run on the lent machine, how well they agree with references, and how fast.

    python benchmarks/gpu_libs.py OUT_DIR        (on the GPU machine; wheels of fla-core and liger-kernel carried)

For each of flash-linear-attention's chunked ops the project trains through (linear_attn, simple_gla, gla,
delta_rule, gated_delta_rule, kda): forward and backward in bf16 at B x T x H x d = 8 x 2048 x 9 x 64 (SmolLM2's
heads), the relative RMS error of output and input gradients against an fp32 run of the same op, and the time of a
forward + backward (median of CUDA events). For liger-kernel: the fused linear JSD (forward KL at beta 0) from
hidden states and the LM head against the full-logit KL, its peak memory and time at 65,536 tokens x 49,152 words.
Each check runs in a child process with its own time limit (a first chunk_gla call on an H100 with Triton 3.6
ran past 400 s: autotuning or a hang), and each finding is appended to OUT_DIR/gpu_libs.jsonl as it is
measured, so a killed run keeps what it found.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from gpu_bench import time_ms  # benchmarks/ is the script's folder, so on sys.path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
OUT.mkdir(parents=True, exist_ok=True)


def record(entry: dict) -> None:
    print(json.dumps(entry), flush=True)
    with open(OUT / "gpu_libs.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def fla_inputs(op: str, B=8, T=2048, H=9, D=64, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
    if op in ("delta_rule", "gated_delta_rule", "kda"):
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    else:
        q, k = q * D ** -0.5, k * D ** -0.5
    extra = {}
    if op == "simple_gla" or op == "gated_delta_rule":
        extra["g"] = torch.nn.functional.logsigmoid(r(B, T, H) + 4)
    if op in ("gla", "kda"):
        extra["g"] = torch.nn.functional.logsigmoid(r(B, T, H, D) + 4)
    if op in ("delta_rule", "gated_delta_rule", "kda"):
        extra["beta"] = torch.sigmoid(r(B, T, H))
    return q, k, v, extra


def fla_call(op: str):
    import fla.ops as ops  # noqa: F401
    if op == "linear_attn":
        from fla.ops.linear_attn import chunk_linear_attn
        return lambda q, k, v, e: chunk_linear_attn(q, k, v, scale=1.0, normalize=False)[0]
    if op == "simple_gla":
        from fla.ops.simple_gla import chunk_simple_gla
        return lambda q, k, v, e: chunk_simple_gla(q, k, v, g=e["g"], scale=1.0)[0]
    if op == "gla":
        from fla.ops.gla import chunk_gla
        return lambda q, k, v, e: chunk_gla(q, k, v, g=e["g"], scale=1.0)[0]
    if op == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule
        return lambda q, k, v, e: chunk_delta_rule(q, k, v, e["beta"], scale=1.0)[0]
    if op == "gated_delta_rule":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return lambda q, k, v, e: chunk_gated_delta_rule(q, k, v, e["g"], e["beta"], scale=1.0)[0]
    from fla.ops.kda import chunk_kda
    return lambda q, k, v, e: chunk_kda(q, k, v, e["g"], e["beta"], scale=1.0)[0]


def check_fla(op: str) -> None:
    entry = {"lib": "fla", "op": op}
    try:
        call = fla_call(op)
        q, k, v, extra = fla_inputs(op)
        grads = {}
        for dtype in (torch.float32, torch.bfloat16):
            leaves = [x.to(dtype).detach().requires_grad_() for x in (q, k, v)]
            out = call(*leaves, {key: val for key, val in extra.items()})
            out.float().pow(2).mean().backward()
            grads[dtype] = (out.detach(), *[x.grad for x in leaves])
        entry["rel_err_bf16_vs_fp32"] = {name: rel(a, b) for name, a, b in
                                         zip(("o", "dq", "dk", "dv"), grads[torch.bfloat16], grads[torch.float32])}
        leaves = [x.bfloat16().detach().requires_grad_() for x in (q, k, v)]

        def step():
            call(*leaves, extra).float().pow(2).mean().backward()
        entry["fwd_bwd_ms_bf16"] = time_ms(step)
        entry["ok"] = all(e < 0.05 for e in entry["rel_err_bf16_vs_fp32"].values())
    except Exception as error:  # a refusal on this image is the finding
        entry.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}", where=traceback.format_exc()[-600:])
    record(entry)


def check_liger(tokens: int = 65536, hidden: int = 576, vocab: int = 49152) -> None:
    entry = {"lib": "liger-kernel", "op": "LigerFusedLinearJSD(beta=0) vs full-logit KL", "tokens": tokens}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        g = torch.Generator(device="cuda").manual_seed(0)
        head = torch.randn(vocab, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
        hs = torch.randn(tokens, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
        ht = (hs.float() + 0.3 * torch.randn(tokens, hidden, device="cuda", generator=g)).bfloat16()

        def full():
            x = hs.detach().requires_grad_()
            s = torch.log_softmax((x @ head.T).float(), -1)
            t = torch.log_softmax((ht @ head.T).float(), -1)
            loss = (t.exp() * (t - s)).sum(-1).mean()
            loss.backward()
            return loss.detach(), x.grad

        jsd = LigerFusedLinearJSD(jsd_beta=0.0)

        def fused():
            x = hs.detach().requires_grad_()
            loss = jsd(x, head, ht, head)
            loss.backward()
            return loss.detach(), x.grad

        for name, fn in (("full", full), ("fused", fused)):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss, grad = fn()
            entry[f"{name}_loss"] = float(loss)
            entry[f"{name}_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            entry[f"{name}_ms"] = time_ms(fn, repeats=5)
            entry[f"{name}_grad_norm"] = float(grad.float().norm())
            if name == "full":
                reference = grad
            else:
                entry["grad_rel_err"] = rel(grad, reference)
        entry["ok"] = abs(entry["fused_loss"] - entry["full_loss"]) < 0.02 * abs(entry["full_loss"]) + 1e-3
    except Exception as error:
        entry.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}", where=traceback.format_exc()[-600:])
    record(entry)


def main() -> None:
    import triton

    record({"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    for check in ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda", "liger"):
        try:
            subprocess.run([sys.executable, __file__, str(OUT), check], timeout=LIMIT_S, check=False)
        except subprocess.TimeoutExpired:
            record({"check": check, "ok": False, "error": f"no result in {LIMIT_S} s (killed)"})


LIMIT_S = 90

if __name__ == "__main__":
    if len(sys.argv) > 2:
        check_liger() if sys.argv[2] == "liger" else check_fla(sys.argv[2])
    else:
        main()
