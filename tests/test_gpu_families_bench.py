"""benchmarks/gpu_families.py runs where fla cannot (CPU) and writes its tables as it goes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_families  # noqa: E402


def test_cpu_run_writes_parity_and_timing_tables(tmp_path):
    assert gpu_families.main(["--device", "cpu", "--lengths", "32", "--parity-length", "16", "--families", "gla", "deltanet",
                              "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_families.json").read_text())
    assert [r["family"] for r in results["parity"]] == ["gla", "deltanet"] and not results["fla"]
    assert all(isinstance(r["torch_ms"], float) and r["sdpa_ms"] > 0 for r in results["timing"])
    table = (tmp_path / "gpu_families.md").read_text()
    assert "| deltanet | 32 | fla not usable here" in table


def test_a_failing_measurement_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("ChunkDeltaRuleFunction does not support float32")

    monkeypatch.setattr(gpu_families, "timed_ms", refuse)
    assert gpu_families.main(["--device", "cpu", "--lengths", "32", "--parity-length", "16", "--families", "gla", "deltanet",
                              "--out", str(tmp_path)]) == 0
    timing = json.loads((tmp_path / "gpu_families.json").read_text())["timing"]
    assert [r["family"] for r in timing] == ["gla", "deltanet"]
    assert all(r["torch_ms"].startswith("error: AssertionError: ChunkDeltaRuleFunction") for r in timing)
