"""benchmarks/decode_bench.py in CPU mode at small sizes (timings on a shared CPU mean little; bytes are exact)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnprobe.errors import AttnprobeError

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_bench", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_architecture_beside_the_original_and_the_split_k_baseline(bench, tmp_path):
    names = ["original", "original-split-k", "all-gated-deltanet", "heads-25-sink+window", "sink+window",
             "layers-1of4-softmax-gdn"]
    rows = bench.run(bench.parse(["--tiny", "--device", "cpu", "--contexts", "32,600", "--batches", "2", "--new-tokens", "3",
                                  "--warmup", "1", "--architectures", ",".join(names), "--out", str(tmp_path)]))
    graph = ["original", "original-split-k", "all-gated-deltanet", "layers-1of4-softmax-gdn"]  # fixed addresses
    rings = ["heads-25-sink+window", "sink+window"]  # window 64 + 4 sinks: a static step once they are full
    eager = [n for n in names if n != "original-split-k"]
    static = {32: graph, 600: [n for n in names if n in graph + rings]}
    assert [(r["context"], r["decode_mode"], r["architecture"]) for r in rows] == [
        (c, m, n) for c in (32, 600) for m, ns in (("static", static[c]), ("eager", eager)) for n in ns]
    by = {(r["context"], r["decode_mode"], r["architecture"]): r for r in rows}
    assert by[(600, "eager", "original")]["weights"] == "random" and by[(32, "eager", "original")]["weights"] == "pretrained"
    for context in (32, 600):
        original, split = by[(context, "static", "original")], by[(context, "static", "original-split-k")]
        assert split["tokens_equal_original"] == 1.0 and split["attention"] == "split-k"
        assert split["step_bytes"] == original["step_bytes"] > split["kv_cache_bytes_measured"] == original["kv_cache_bytes_measured"]
        cost = {name: by[(context, "eager", name)]["kv_cache_bytes_measured"] for name in eager}
        # 25 % of the 8 KV heads keep their cache (2 whole groups); sink+window buffers for the other 24 of 32 heads
        assert cost["heads-25-sink+window"] == cost["original"] / 4 + cost["sink+window"] * 3 / 4
        # 1 of 4 layers softmax: a quarter of the original's cache, beside the other layers' states
        assert cost["layers-1of4-softmax-gdn"] > cost["original"] / 4
        assert by[(context, "eager", "original")]["cache_ratio"] == 1.0
    assert by[(600, "static", "all-gated-deltanet")]["cache_ratio_vs_split_k"] < 0.1  # a fixed state
    split = by[(600, "static", "original-split-k")]
    assert by[(600, "eager", "sink+window")]["decode_speedup_vs_split_k"] == pytest.approx(  # eager rows: the graph baseline
        by[(600, "eager", "sink+window")]["decode_tokens_per_s"] / split["decode_tokens_per_s"])
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_ms"] > 0 and r["step_ms"] > 0 for r in rows)
    assert "hbm_share" not in rows[0]  # a CPU has no HBM peak in the table
    saved = json.loads((tmp_path / "decode_bench.json").read_text())
    assert saved["rows"] == rows and len((tmp_path / "decode_bench.jsonl").read_text().splitlines()) == len(rows)
    assert (tmp_path / "decode_bench.md").read_text().count("\n| ") == len(rows) + 1


def test_exact_heads_fill_whole_kv_groups_first(bench):
    model = bench.tiny_model("cpu", torch.float32)  # 4 layers, 8 query heads on 2 KV heads
    assert bench.exact_heads(model, 0.25) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    assert bench.exact_heads(model, 0.625) == {0: [0, 1, 2, 3, 4, 5, 6, 7], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
    edits = bench.architecture_edits(model, "heads-12.5-gated-deltanet")
    assert [(e.layer, list(e.heads)) for e in edits] == [(0, [4, 5, 6, 7])] + [(layer, list(range(8))) for layer in (1, 2, 3)]


def test_goals_and_bad_input(bench, tmp_path):
    row = {"architecture": "original-split-k", "context": 32768, "batch": 8, "decode_mode": "cuda-graph",
           "hbm_share": 0.62, "times_bound": 1.6}
    assert bench.goals([row, {**row, "architecture": "all-kda", "times_bound": 3.5}]) == [
        "original-split-k at 32768, batch 8 (cuda-graph): 62% of HBM (goal >= 50%): met",
        "all-kda at 32768, batch 8 (cuda-graph): 3.50x its bound (goal <= 3x): NOT met"]
    model = bench.tiny_model("cpu", torch.float32)
    need = bench.needed_bytes(model, 4096, 64)
    bench.check_fits(model, [4096], [64], 8, 4, free=int(need / 0.85))
    with pytest.raises(AttnprobeError, match=r"batch 64 at 4096 tokens needs about .* GB free: run it without that batch"):
        bench.check_fits(model, [4096], [64], 8, 4, free=int(need / 0.95))
    with pytest.raises(AttnprobeError, match="unknown architecture 'all-nothing'"):
        bench.architecture_edits(model, "all-nothing")
    done = subprocess.run([sys.executable, str(PATH), "--tiny", "--device", "cpu", "--contexts", "8", "--new-tokens", "8",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: a context of 8 leaves no prompt before 4 + 8 steps: lower --new-tokens or raise --contexts"]
