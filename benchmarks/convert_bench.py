"""Conversion throughput on the CPU, and the FLOP count both conversion benchmarks use.

    python benchmarks/convert_bench.py [--model PATH] [--kernel hedgehog] [--length 128] [--batch 4] [--steps 4]
        [--recompute-layers | --memory]

Converts every head of a model (default: a tiny random Llama with a trained BPE tokenizer, built on the
spot) with --kernel (none: the control) through both stages on user text, and prints stage-1 and stage-2
tokens/s, the process's peak resident memory, and the FLOPs per training token of SmolLM2's shape.
--memory runs the same conversion twice, in two fresh processes, with stage 2 keeping its activations and
with --recompute-layers, and prints both peaks, their ratio and whether the losses agree.

FLOPs per stage-2 token (`stage2_flops_per_token`): a teacher forward plus a student forward and backward.
A forward costs 2 x (linear-layer weights, LM head included) plus causal attention 2 x T x head_dim per head
and layer (QK^T and PV over T/2 keys on average). The student's backward is counted as 2 forwards (the
PaLM convention of MFU, as for full fine-tuning); with frozen weights the work actually needed is closer
to 1 forward, which `needed` reports.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

H200_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of one H200 (SXM)


def forward_flops_per_token(n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn: int,
                            vocab: int, length: int) -> float:
    attention_weights = d_model * head_dim * (2 * n_heads + 2 * n_kv_heads)  # q, o and k, v
    linear = n_layers * (attention_weights + 3 * d_model * ffn) + d_model * vocab
    attention = n_layers * n_heads * 2 * length * head_dim
    return 2 * linear + attention


def stage2_flops_per_token(config, length: int) -> dict:
    """Model FLOPs per stage-2 token of an HF config: {"forward", "mfu_count" (PaLM), "needed"}."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    forward = forward_flops_per_token(text.num_hidden_layers, text.hidden_size, heads,
                                      getattr(text, "num_key_value_heads", None) or heads,
                                      getattr(text, "head_dim", None) or text.hidden_size // heads,
                                      text.intermediate_size, text.vocab_size, length)
    return {"forward": forward, "mfu_count": 4 * forward, "needed": 3 * forward}


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model spec (default: a tiny random Llama)")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--kernel", default="hedgehog", help="any registered kernel, or 'none' for the control")
    parser.add_argument("--recompute-layers", action="store_true")
    parser.add_argument("--memory", action="store_true", help="peak memory with and without --recompute-layers, side by side")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one line for --memory to read
    args = parser.parse_args()
    if args.memory:
        return memory_side_by_side(args)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from attnprobe.analyses.conversion import train as conversion
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model
    from attnprobe.probe import texts

    work = Path(tempfile.mkdtemp())
    if args.model is None:
        from tiny_hf import tiny_model_dir

        args.model = str(tiny_model_dir(work))
    model = load_model(args.model, device="cpu")
    backend = make_backend("native", model)
    (work / "train.txt").write_text(texts.prose())
    tokens = args.steps * args.batch * args.length
    kernel = None if args.kernel == "none" else args.kernel
    config = conversion.ConvertConfig(kernel=kernel, length=args.length, batch=args.batch, transfer_tokens=tokens,
                                      tokens=tokens, checkpoint_every=10 ** 9)
    data = training_data(model, 2 * tokens, args.length, [work / "train.txt"])
    seconds: dict[str, list[float]] = {"transfer": [], "end_to_end": []}
    last = [time.perf_counter()]

    def on_step(report):
        now = time.perf_counter()
        seconds[report.stage].append(now - last[0])
        last[0] = now

    heads = {layer: list(range(model.info.n_heads)) for layer in range(model.info.n_layers)} if kernel else {}
    manifest = conversion.convert(model, backend, heads, config, data, work / "run", on_step=on_step,
                                  recompute_layers=args.recompute_layers)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    if args.json:
        print(json.dumps({"peak_mb": peak_mb, "stage2_losses": manifest["losses"]["end_to_end"],
                          "stage2_seconds": sum(seconds["end_to_end"])}))
        return
    per_step = args.batch * args.length
    print(f"model {args.model}: {model.info.n_layers} layers x {model.info.n_heads} heads, T = {args.length}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    for stage, times in seconds.items():
        steady = times[1:] or times  # the first step pays for allocation
        print(f"  {stage:<11} {per_step * len(steady) / sum(steady):8.0f} tokens/s ({len(times)} steps)")
    print(f"  peak resident memory {peak_mb:,.0f} MB{' (layers recomputed)' if args.recompute_layers else ''}")
    for length in (512, 1024, 2048):
        flops = stage2_flops_per_token(smollm2_config(), length)
        print(f"SmolLM2 shape, T = {length}: forward {flops['forward'] / 1e6:.0f} MFLOP/token, stage 2 "
              f"{flops['mfu_count'] / 1e9:.2f} GFLOP/token (MFU count), 30 % of an H200 = "
              f"{0.3 * H200_BF16_PEAK / flops['mfu_count']:,.0f} tokens/s")


def memory_side_by_side(args) -> None:
    """The conversion in two fresh processes (a peak resident set only grows): activations kept, then recomputed."""
    runs = {}
    for recompute in (False, True):
        command = [sys.executable, __file__, "--json", "--kernel", args.kernel, "--length", str(args.length),
                   "--batch", str(args.batch), "--steps", str(args.steps)] + (["--model", args.model] if args.model else [])
        output = subprocess.run(command + (["--recompute-layers"] if recompute else []), check=True,
                                capture_output=True, text=True).stdout
        runs[recompute] = json.loads(output.strip().splitlines()[-1])
    kept, redone = runs[False], runs[True]
    same = all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(kept["stage2_losses"], redone["stage2_losses"]))
    print(f"kernel {args.kernel}, T = {args.length}, batch {args.batch}, {args.steps} steps per stage, fp32 on the CPU")
    print(f"  activations kept:       peak {kept['peak_mb']:8,.0f} MB, stage 2 {kept['stage2_seconds']:6.1f} s")
    print(f"  layers recomputed:      peak {redone['peak_mb']:8,.0f} MB, stage 2 {redone['stage2_seconds']:6.1f} s")
    print(f"  peak ratio {redone['peak_mb'] / kept['peak_mb']:.2f}; stage-2 losses {'equal' if same else 'DIFFER'}: "
          f"{kept['stage2_losses']} / {redone['stage2_losses']}")


if __name__ == "__main__":
    main()
