"""Conversion throughput on the CPU, and the FLOP count both conversion benchmarks use.

    python benchmarks/convert_bench.py [--model PATH] [--length 128] [--batch 4] [--steps 4]

Converts every head of a model (default: a tiny random Llama with a trained BPE tokenizer, built on the
spot) with hedgehog through both stages on user text, and prints stage-1 and stage-2 tokens/s, and the
FLOPs per training token of the model named by --flops-for (default SmolLM2's shape) at --length.

FLOPs per stage-2 token (`stage2_flops_per_token`): a teacher forward plus a student forward and backward.
A forward costs 2 x (linear-layer weights, LM head included) plus causal attention 2 x T x head_dim per head
and layer (QK^T and PV over T/2 keys on average). The student's backward is counted as 2 forwards (the
PaLM convention of MFU, as for full fine-tuning); with frozen weights the work actually needed is closer
to 1 forward, which `needed` reports.
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from attnprobe.analyses import convert as conversion
    from attnprobe.analyses.data import training_data
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
    config = conversion.ConvertConfig(kernel="hedgehog", length=args.length, batch=args.batch, transfer_tokens=tokens,
                                      tokens=tokens, checkpoint_every=10 ** 9)
    data = training_data(model, 2 * tokens, args.length, [work / "train.txt"])
    seconds: dict[str, list[float]] = {"transfer": [], "end_to_end": []}
    last = [time.perf_counter()]

    def on_step(report):
        now = time.perf_counter()
        seconds[report.stage].append(now - last[0])
        last[0] = now

    heads = {layer: list(range(model.info.n_heads)) for layer in range(model.info.n_layers)}
    conversion.convert(model, backend, heads, config, data, work / "run", on_step=on_step)
    per_step = args.batch * args.length
    print(f"model {args.model}: {model.info.n_layers} layers x {model.info.n_heads} heads, T = {args.length}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    for stage, times in seconds.items():
        steady = times[1:] or times  # the first step pays for allocation
        print(f"  {stage:<11} {per_step * len(steady) / sum(steady):8.0f} tokens/s ({len(times)} steps)")
    for length in (512, 1024, 2048):
        flops = stage2_flops_per_token(smollm2_config(), length)
        print(f"SmolLM2 shape, T = {length}: forward {flops['forward'] / 1e6:.0f} MFLOP/token, stage 2 "
              f"{flops['mfu_count'] / 1e9:.2f} GFLOP/token (MFU count), 30 % of an H200 = "
              f"{0.3 * H200_BF16_PEAK / flops['mfu_count']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
