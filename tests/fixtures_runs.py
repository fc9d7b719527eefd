"""Write a small synthetic run directory with every table a census can produce, for figure tests.

The numbers are random but shaped like a real run (a sink at position 0, a few retrieval and
induction heads, massive activations from an early layer on, sliding and full layers), so figures
drawn from them exercise the same code paths as real data.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

TABLES = ("heads", "massive_layers", "massive", "sinks", "secondary_sinks", "sink_rate", "niah",
          "ablation", "matrix", "recall", "budget")
TOKENS = ["<s>", ".", ",", "\n", " the", " of", " and", " key", " is", " 7"]


def write_synthetic_run(run_dir: Path, n_layers: int = 6, n_heads: int = 4, n_kv_heads: int = 2,
                        omit: tuple[str, ...] = (), seed: int = 0) -> Path:
    """Write a run into `run_dir` (created); tables named in `omit` (see TABLES) are left out."""
    rng = np.random.default_rng(seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    layer_types = ["full" if layer % 3 == 2 else "sliding" for layer in range(n_layers)]
    manifest = {
        "model_id": "synthetic-tiny", "weights_sha256": "0" * 64, "backend": "native", "dtype": "float32",
        "bos": True, "seed": seed, "lengths": [256, 512], "versions": {"torch": "2.x", "transformers": "5.x"},
        "wall_time_s": 12.5,
        "info": {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": 16,
                 "layer_types": layer_types, "sliding_window": 128},
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tables = {
        "heads": _heads(rng, n_layers, n_heads, n_kv_heads, layer_types),
        "massive_layers": _massive_layers(rng, n_layers),
        "massive": _massive(rng, n_layers),
        "sinks": _sinks(rng, n_layers, n_heads),
        "secondary_sinks": _secondary(rng, n_layers),
        "niah": _niah(rng),
        "ablation": _ablation(rng),
        "matrix": _matrix(),
        "recall": _recall(rng),
        "budget": _budget(rng),
    }
    for name, table in tables.items():
        if name not in omit:
            table.to_parquet(run_dir / f"{name}.parquet", index=False)
    if "sink_rate" not in omit:
        rate = {"T": 64, "eps": 0.3, "with_bos": 87.5, "without_bos": 41.7, "n_sequences": 100}
        (run_dir / "sink_rate.json").write_text(json.dumps(rate))
    return run_dir


def _heads(rng, n_layers, n_heads, n_kv_heads, layer_types) -> pd.DataFrame:
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            alpha_1 = float(np.clip(rng.beta(5, 2) if layer > 0 else rng.beta(1, 4), 0, 1))
            scores = {
                "retrieval_score": float(rng.beta(1, 8)) + (0.6 if (layer, head) == (n_layers - 2, 1) else 0),
                "prev_token_score": float(rng.beta(1, 6)) + (0.7 if (layer, head) == (1, 0) else 0),
                "induction_score": float(rng.beta(1, 8)) + (0.8 if (layer, head) == (2, 3) else 0),
                "duplicate_score": float(rng.beta(1, 10)),
            }
            hidden = int(rng.integers(0, 4))
            roles = [name for name, key in (("retrieval", "retrieval_score"), ("previous_token", "prev_token_score"),
                                            ("induction", "induction_score"), ("duplicate", "duplicate_score"))
                     if scores[key] > 0.4]
            roles += ["sink"] if alpha_1 > 0.3 else []
            roles += ["hidden_sink"] if hidden else []
            rows.append({
                "layer": layer, "head": head, "kv_head": head // (n_heads // n_kv_heads),
                "layer_type": layer_types[layer], "retrieval_activation": float(rng.uniform(0, 2)),
                "alpha_1": alpha_1, "hidden_sink_count": hidden,
                "hidden_sink_max": float(rng.uniform(0.1, 0.4)) if hidden else 0.0,
                "hidden_sink_tokens": ",".join(rng.choice(TOKENS[1:4], size=hidden)) if hidden else "",
                "roles": ",".join(roles), **scores,
            })
    return pd.DataFrame(rows)


def _massive_layers(rng, n_layers) -> pd.DataFrame:
    top1 = np.where(np.arange(n_layers) >= 2, _massive_size(np.arange(n_layers)), rng.uniform(5, 20, n_layers))
    return pd.DataFrame({"layer": range(n_layers), "top1": top1, "top2": top1 * 0.6, "top3": top1 * 0.05,
                         "median": rng.uniform(0.5, 3, n_layers)})


def _massive(rng, n_layers) -> pd.DataFrame:
    rows = []
    for layer in range(2, n_layers):
        for position, token, dim, scale in ((0, "<s>", 507, 1.0), (5, ".", 507, 0.6), (0, "<s>", 12, -0.5)):
            value = scale * _massive_size(layer)
            median = float(rng.uniform(0.5, 3))
            rows.append({"layer": layer, "position": position, "token": token, "dim": dim, "value": value,
                         "median": median, "ratio": abs(value) / median})
    return pd.DataFrame(rows)


def _massive_size(layer):
    return np.minimum(600.0 * 1.5 ** layer, 22500.0)  # grows, then saturates like SmolLM2's


def _sinks(rng, n_layers, n_heads) -> pd.DataFrame:
    events = [{"layer": int(rng.integers(n_layers)), "head": int(rng.integers(n_heads)),
               "position": int(rng.integers(1, 200)), "token": str(rng.choice(TOKENS[1:6], p=[0.4, 0.25, 0.2, 0.1, 0.05])),
               "alpha": float(rng.uniform(0.1, 0.5))} for _ in range(60)]
    return pd.DataFrame(events)


def _secondary(rng, n_layers) -> pd.DataFrame:
    rows = [{"position": 0, "token": "<s>", "creation_layer": 1, "lifetime": n_layers - 1, "sink_class": "primary",
             "mlp_cos": 0.95, "mlp_norm": 80.0, "level": 0}]
    for index in range(12):
        level = 1 + index % 2
        rows.append({"position": int(rng.integers(1, 200)), "token": str(rng.choice([" ", ".", "\n"])),
                     "creation_layer": 2 + level, "lifetime": 3 - level + int(rng.integers(0, 2)),
                     "sink_class": "secondary" if level == 1 else "noise", "mlp_cos": float(rng.uniform(0.5, 0.95)),
                     "mlp_norm": float(rng.uniform(5, 40)), "level": level})
    return pd.DataFrame(rows)


def _niah(rng) -> pd.DataFrame:
    rows = []
    for variant, skill in (("softmax", 0.95), ("hybrid", 0.7), ("linear", 0.2)):
        for task in ("passkey", "niah"):
            for length in (256, 512, 1024):
                for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
                    p = skill * (1.0 - 0.3 * depth * (length / 1024))
                    for sample in range(4):
                        rows.append({"variant": variant, "task": task, "length": length, "depth": depth,
                                     "sample": sample, "correct": bool(rng.random() < p)})
    return pd.DataFrame(rows)


def _ablation(rng) -> pd.DataFrame:
    rows = []
    for task in ("passkey", "niah"):
        for k in (0, 1, 2, 4, 8):
            rows.append({"task": task, "selection": "top", "k": k, "seed": -1, "n": 40,
                         "accuracy": float(rng.binomial(40, np.clip(0.95 - 0.1 * k, 0, 1)) / 40)})
            for seed in range(10):  # random draws, each scored on the same 40 samples
                rows.append({"task": task, "selection": "random", "k": k, "seed": seed, "n": 40,
                             "accuracy": float(rng.binomial(40, np.clip(0.95 - 0.01 * k, 0, 1)) / 40)})
    return pd.DataFrame(rows)


def _matrix() -> pd.DataFrame:
    return pd.DataFrame([
        {"architecture": "softmax", "sinks_present": True, "massive_present": True, "retrieval_present": True,
         "induction_present": True, "passkey_acc": 1.0, "passkey_ci_low": 0.9, "passkey_ci_high": 1.0,
         "kv_recall_acc": 0.98, "copy_acc": 0.99, "perplexity": 12.3, "state_bytes_per_token": 36864,
         "kv_cache_bytes_measured_1024": 3.8e7, "decode_tokens_per_s_1024": 41.0},
        {"architecture": "hybrid 1:5", "sinks_present": True, "massive_present": True, "retrieval_present": True,
         "induction_present": True, "passkey_acc": 0.9, "kv_recall_acc": 0.7, "copy_acc": 0.8,
         "perplexity": 13.1, "state_bytes_per_token": 6144,
         "kv_cache_bytes_measured_1024": 6.5e6, "decode_tokens_per_s_1024": 55.0},
        {"architecture": "linear (elu+1)", "sinks_present": False, "massive_present": True, "retrieval_present": False,
         "induction_present": True, "passkey_acc": 0.1, "kv_recall_acc": 0.05, "copy_acc": 0.2,
         "perplexity": 19.8, "state_bytes_per_token": 0,
         "kv_cache_bytes_measured_1024": 1.1e6, "decode_tokens_per_s_1024": 90.0},
    ])


def _recall(rng) -> pd.DataFrame:
    """recall.parquet of a matrix: one row per sample, passkey by length for each architecture."""
    rows = []
    for variant, skill in (("softmax", 0.95), ("hybrid 1:5", 0.7), ("linear (elu+1)", 0.15)):
        for length in (256, 512, 1024):
            for sample in range(4):
                rows.append({"variant": variant, "task": "passkey", "length": length, "depth": 0.5, "sample": sample,
                             "correct": bool(rng.random() < skill)})
    return pd.DataFrame(rows)


def _budget(rng) -> pd.DataFrame:
    """budget.parquet of a selector x budget sweep: references, two selectors, random over two draws."""
    cells = [("none", "all-exact", -1, 1.0), ("sink+window:sinks=4,window=64", "none-exact", -1, 0.0)]
    cells += [("sink+window:sinks=4,window=64", selector, seed, budget) for budget in (0.125, 0.25, 0.5)
              for selector, seed in (("retrieval", 0), ("duo", 0), ("random", 0), ("random", 1))]
    rows = []
    for kind, selector, seed, budget in cells:
        for task in ("passkey", "niah"):
            n = 18
            correct = int(rng.binomial(n, min(1.0, 0.2 + budget)))
            rows.append({"kind": kind, "selector": selector, "seed": seed, "budget": budget, "units": int(budget * 18),
                         "exact_heads": int(budget * 72), "task": task, "correct": correct, "n": n, "accuracy": correct / n,
                         "ci_low": max(0.0, correct / n - 0.2), "ci_high": min(1.0, correct / n + 0.2), "perplexity": 20.0,
                         "kv_bytes_per_token": int(budget * 1000), "fixed_bytes": 0})
    return pd.DataFrame(rows)
