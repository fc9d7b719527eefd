"""The decode frontier (analyses/efficiency/frontier.py): recall against measured cache and against decode
speed relative to the split-K softmax baseline, from decode_bench rows and a recall table."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from attnprobe.analyses.efficiency.frontier import decode_frontier, frontier_points
from attnprobe.errors import AttnprobeError


def rows():
    base = {"context": 32768, "batch": 8}
    return pd.DataFrame([
        {**base, "architecture": "original", "decode_mode": "cuda-graph", "decode_tokens_per_s": 470.0, "kv_cache_bytes_measured": 6e9},
        {**base, "architecture": "original", "decode_mode": "eager", "decode_tokens_per_s": 300.0, "kv_cache_bytes_measured": 6e9},
        {**base, "architecture": "original-split-k", "decode_mode": "cuda-graph", "decode_tokens_per_s": 2000.0,
         "kv_cache_bytes_measured": 6e9, "hbm_share": 0.6},
        {**base, "architecture": "all-gated-deltanet", "decode_mode": "cuda-graph", "decode_tokens_per_s": 5000.0,
         "kv_cache_bytes_measured": 4e7, "hbm_share": 0.2},
        {**base, "architecture": "sink+window+gdn", "decode_mode": "eager", "decode_tokens_per_s": 1000.0, "kv_cache_bytes_measured": 9e7},
        {**base, "architecture": "heads-12.5-gated-deltanet", "decode_mode": "eager", "decode_tokens_per_s": 900.0,
         "kv_cache_bytes_measured": 8e8},  # not in the recall table: left out
        {**base, "batch": 1, "architecture": "original-split-k", "decode_mode": "cuda-graph", "decode_tokens_per_s": 400.0,
         "kv_cache_bytes_measured": 7e8},
    ])


def recall():
    hits = {"original": 4, "all-gated-deltanet": 1, "sink+window+gdn": 2}
    return pd.DataFrame([{"variant": v, "task": "passkey", "length": 1024, "correct": i < n} for v, n in hits.items() for i in range(4)])


def test_points_take_each_architectures_fastest_mode_against_the_baseline():
    points = frontier_points(rows(), recall(), 32768, 8).set_index("architecture")
    assert list(points.index) == ["original", "original-split-k", "all-gated-deltanet", "sink+window+gdn"]
    assert points.at["original", "speedup_vs_split_k"] == pytest.approx(470 / 2000) and points.at["original", "mode"] == "cuda-graph"
    assert points.at["all-gated-deltanet", "speedup_vs_split_k"] == pytest.approx(2.5)
    assert points.at["original-split-k", "correct"] == 4 and points.at["all-gated-deltanet", "correct"] == 1
    assert points["total"].eq(4).all() and points.at["sink+window+gdn", "cache_bytes"] == 9e7
    with pytest.raises(AttnprobeError, match="no original-split-k row at 8192 tokens, batch 8"):
        frontier_points(rows(), recall(), 8192, 8)


def test_the_figure_and_its_script(tmp_path):
    fig = decode_frontier(rows(), recall(), 32768, 8)
    labels = [text.get_text() for ax in fig.axes for text in ax.texts]
    assert "all-gated-deltanet (20% HBM)" in labels and "all-gated-deltanet" in labels  # right panel carries the share
    (tmp_path / "decode_bench.json").write_text(json.dumps({"rows": rows().to_dict("records")}))
    recall().to_parquet(tmp_path / "recall.parquet")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_frontier.py"
    spec = importlib.util.spec_from_file_location("decode_frontier", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.main([str(tmp_path / "decode_bench.json"), str(tmp_path / "recall.parquet"), "--out", str(tmp_path / "fig")])
    assert {p.suffix for p in written} == {".png", ".svg"} and all(p.stat().st_size > 0 for p in written)
    assert len(pd.read_csv(tmp_path / "fig" / "decode_frontier.csv")) == 4
