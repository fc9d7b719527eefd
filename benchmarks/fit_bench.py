"""Attention transfer on SmolLM2: mean fit error per kernel as the Adam steps grow, and the perplexity of
the model with every head replaced, unfitted and fitted.

    python benchmarks/fit_bench.py [--layers 3 15] [--steps 0 10 30 100] [--ppl-tokens 1024] [--fit-ppl]

Fit errors are on the calibration text (4 x 256 held-out tokens); perplexity on other held-out text.
--fit-ppl also fits every layer for the fitted perplexity (minutes per learned kernel on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import time

import torch

from attnprobe.hooks.model import load_model
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.swap import collect_teacher, swap_edits
from attnprobe.kernels.fit import fit_kernels, head_errors
from attnprobe.kernels.registry import make_kernel
from attnprobe.probe import texts
from attnprobe.probe.perplexity import held_out_perplexity

LEARNED = ("hedgehog", "window+linear", "sink+window+linear")
FIXED = ("elu", "relu", "taylor", "performer", "sink+window")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 15])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 30, 100])
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--fit-ppl", action="store_true")
    args = parser.parse_args()
    model = load_model("smollm2-135m")
    backend = NativeBackend(model)
    calibration = torch.tensor(texts.fit_ids(model.tokenizer, 4 * 256)).view(4, 256)  # fit text, never scored
    teachers = collect_teacher(backend, calibration, args.layers)
    print(f"fit error (mean MSE over the {9 * len(args.layers)} heads of layers {args.layers}), by Adam steps")
    print("| kernel | " + " | ".join(f"{s} steps" for s in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    for name in FIXED:
        errors = torch.cat([head_errors(make_kernel(name, 9, 64), teachers[layer]) for layer in args.layers])
        print(f"| {name} | {float(errors.mean()):.4f} (no parameters) |" + " |" * (len(args.steps) - 1))
    for name in LEARNED:
        cells = []
        for steps in args.steps:
            start = time.time()
            fit = fit_kernels(name, teachers, steps=steps)
            errors = torch.cat([head_errors(fit.kernels[layer], teachers[layer]) for layer in args.layers])
            cells.append(f"{float(errors.mean()):.4f} ({time.time() - start:.0f} s)")
        print(f"| {name} | " + " | ".join(cells) + " |")

    def ppl(edits) -> float:
        return held_out_perplexity(backend, args.ppl_tokens, edits=edits)

    print(f"\nperplexity on {args.ppl_tokens} held-out tokens, every head replaced")
    print(f"| kernel | unfitted |{' fitted (30 steps) |' if args.fit_ppl else ''}")
    print("|---|---|" + ("---|" if args.fit_ppl else ""))
    print(f"| softmax (original) | {ppl([]):.2f} |")
    for name in FIXED + LEARNED:
        row = f"| {name} | {ppl(swap_edits(model, name)):.2f} |"
        if args.fit_ppl and name in LEARNED:
            all_layers = list(range(model.info.n_layers))
            fit = fit_kernels(name, collect_teacher(backend, calibration, all_layers), steps=30)
            row += f" {ppl(swap_edits(model, fit)):.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
