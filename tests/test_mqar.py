"""MQAR through the kernels (benchmarks/mqar.py): the families separate as the literature says."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mqar  # noqa: E402


def test_softmax_recalls_the_delta_rule_beats_plain_linear_attention():
    """16 pairs at d = 16: softmax stores every pair; elu's additive d x d state blurs them; the delta rule
    (which can overwrite) recalls clearly more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy = {name: mqar.train_and_test(name, 16, 16, steps=150, test_size=500) for name in ("softmax", "elu", "deltanet")}
    finally:
        torch.set_num_threads(threads)
    assert accuracy["softmax"] > 0.8
    assert accuracy["elu"] < 0.3
    assert accuracy["deltanet"] > accuracy["elu"] + 0.2, accuracy
