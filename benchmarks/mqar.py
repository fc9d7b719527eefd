"""Multi-query associative recall (MQAR, Arora et al. 2023, Zoology) straight through each kernel family.

    python benchmarks/mqar.py [--families softmax elu ...] [--pairs 8 16 32 64] [--dims 16 32] [--steps 300] [--out DIR]

A sequence holds N key-value pairs, one per position (key embedding -> k and q projections, value
embedding -> v), then a query position whose q is a stored key's projection (its own k and v are a
learned marker's); the kernel's output there is read out to the value. Embeddings, projections,
readout and the kernel's own parameters are trained together with Adam, so each family shows what
its state can store at head dimension d: softmax keeps every token; a linear state holds d x d
numbers; the delta rule can overwrite, plain linear attention only adds. Accuracy is measured on
fresh sequences. Prints one table row per (family, d) and, with --out, writes mqar.json / mqar.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import import_attnprobe  # noqa: E402

FAMILIES = ("softmax", "elu", "hedgehog", "gla", "decay", "deltanet", "gated-deltanet")
VOCAB = 128  # keys and values
TEST_SIZE = 1000  # fresh test sequences per cell, one query each: independent samples


class Recall(nn.Module):
    """One head of kernel `name` between embeddings and a readout."""

    def __init__(self, name: str, dim: int, seed: int) -> None:
        super().__init__()
        from attnprobe.kernels.registry import make_kernel

        torch.manual_seed(seed)
        self.keys, self.values = nn.Embedding(VOCAB + 1, dim), nn.Embedding(VOCAB + 1, dim)  # index VOCAB: the marker
        self.wq, self.wk = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.kernel = make_kernel(name, 1, dim)
        self.readout = nn.Linear(dim, VOCAB)
        self.dim = dim

    def forward(self, keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """keys, values (B, N), query (B,): logits over values at the query position (B, VOCAB)."""
        marker = torch.full_like(query, VOCAB)[:, None]
        key_ids = torch.cat([keys, marker], dim=1)
        q = self.wq(torch.cat([self.keys(keys), self.keys(query)[:, None]], dim=1))
        k = self.wk(self.keys(key_ids))
        v = self.values(torch.cat([values, marker], dim=1))
        z = self.kernel.quadratic(q[:, None], k[:, None], v[:, None], self.dim ** -0.5)
        return self.readout(z[:, 0, -1])


def batch(n_pairs: int, size: int, generator: torch.Generator):
    """size sequences of n_pairs distinct keys with random values, and one stored key to query each."""
    keys = torch.rand(size, VOCAB, generator=generator).argsort(dim=1)[:, :n_pairs]
    values = torch.randint(0, VOCAB, (size, n_pairs), generator=generator)
    pick = torch.randint(0, n_pairs, (size,), generator=generator)
    rows = torch.arange(size)
    return keys, values, keys[rows, pick], values[rows, pick]


def train_and_test(name: str, n_pairs: int, dim: int, steps: int, batch_size: int = 128, lr: float = 3e-3,
                   seed: int = 0, test_size: int = TEST_SIZE) -> float:
    """Accuracy of the trained model on `test_size` fresh sequences."""
    model = Recall(name, dim, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        keys, values, query, answer = batch(n_pairs, batch_size, generator)
        loss = nn.functional.cross_entropy(model(keys, values, query), answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    keys, values, query, answer = batch(n_pairs, test_size, torch.Generator().manual_seed(seed + 10_000))
    with torch.no_grad():
        return float((model(keys, values, query).argmax(-1) == answer).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import_attnprobe()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    rows = []
    header = "| family | d | " + " | ".join(f"{n} pairs" for n in args.pairs) + " | s |"
    lines = [f"MQAR accuracy ({args.steps} Adam steps x 128 sequences, 1,000 test sequences, vocab {VOCAB}, seed {args.seed})", "",
             header, "|" + "---|" * (len(args.pairs) + 3)]
    print("\n".join(lines), flush=True)
    for dim in args.dims:
        for name in args.families:
            start = time.perf_counter()
            accuracy = [train_and_test(name, n, dim, args.steps, seed=args.seed) for n in args.pairs]
            rows.append({"family": name, "dim": dim, "pairs": args.pairs, "accuracy": accuracy, "test_sequences": TEST_SIZE,
                         "steps": args.steps, "seed": args.seed, "vocab": VOCAB})
            lines.append(f"| {name} | {dim} | " + " | ".join(f"{a:.2f}" for a in accuracy) + f" | {time.perf_counter() - start:.0f} |")
            print(lines[-1], flush=True)
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "mqar.json").write_text(json.dumps(rows, indent=1))
                (args.out / "mqar.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
