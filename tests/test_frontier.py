"""The frontier figure: recall against measured decode memory and throughput, one point per architecture."""
from __future__ import annotations

import pandas as pd
import pytest

from attnprobe.analyses.presentation import figures
from attnprobe.analyses.experiments.ablation import wilson_interval
from attnprobe.errors import AttnprobeError


def tables():
    matrix = pd.DataFrame({
        "architecture": ["original", "all-hedgehog", "keep-random-heads"],
        "kv_cache_bytes_measured_256": [1e5, 2e4, 5e4], "kv_cache_bytes_measured_1024": [4e5, 2e4, 2e5],
        "decode_tokens_per_s_256": [50.0, 80.0, 60.0], "decode_tokens_per_s_1024": [30.0, 80.0, 40.0],
        "decode_tokens_per_s_32768": [float("nan")] * 3,  # past the window: not measured
    })
    rows = []
    for variant, hits in (("original", {128: 4, 256: 3, 512: 1}), ("all-hedgehog", {128: 2, 256: 1, 512: 0}),
                          ("keep-random-heads", {128: 1, 256: 0, 512: 0})):
        for length, correct in hits.items():
            rows += [{"variant": variant, "task": "passkey", "length": length, "correct": i < correct} for i in range(4)]
    rows.append({"variant": "original", "task": "copying", "length": 16, "correct": True})
    return matrix, pd.DataFrame(rows)


def test_frontier_plots_each_architecture_at_the_longest_solved_length_and_context():
    matrix, recall = tables()
    assert figures.passkey_frontier_length(recall) == 256  # 3/4 at 256, 1/4 at 512
    assert figures.longest_measured(matrix, "decode_tokens_per_s") == 1024  # 32768 holds no measurement
    fig = figures.frontier(matrix, recall)
    memory, speed = fig.axes
    assert "256 tokens" in memory.get_ylabel() and "1024 tokens" in memory.get_xlabel() and memory.get_xscale() == "log"
    points = {text.get_text(): text.xy for text in memory.texts}
    assert points == {"original": (4e5, 0.75), "all-hedgehog": (2e4, 0.25), "keep-random-heads": (2e5, 0.0)}
    assert {text.get_text(): text.xy for text in speed.texts}["all-hedgehog"] == (80.0, 0.25)
    low, high = wilson_interval(3, 4)  # the original's error bar is its Wilson interval
    bars = [c for c in memory.collections if len(c.get_segments()) == 1]
    assert any(abs(seg[0][1] - low) < 1e-9 and abs(seg[1][1] - high) < 1e-9 for c in bars for seg in c.get_segments())
    markers = [line.get_marker() for line in memory.lines if line.get_marker() not in ("None", "_", None)]
    assert "*" in markers  # the original is marked
    fig.canvas.draw()  # the style turns mathtext off: log ticks must read as bytes, not '$\\mathdefault{10^{5}}$'
    ticks = [label.get_text() for label in memory.get_xticklabels() if label.get_text()]
    assert ticks and all("$" not in tick and tick.endswith("B") for tick in ticks), ticks


def test_frontier_needs_measured_columns():
    matrix, recall = tables()
    with pytest.raises(AttnprobeError, match="measured efficiency"):
        figures.frontier(matrix[["architecture"]], recall)


def test_labels_of_points_that_lie_together_are_stacked():
    from attnprobe.analyses.presentation.figures import label_lifts

    # 9.0 MB and 9.4 MB at accuracy 0 (all-hedgehog and sink+window on one log axis), 4.4 MB a third of the span
    # away, 0.38 GB far off, and one point above them
    points = [(9.0e6, 0.0), (9.4e6, 0.0), (1.5e6, 0.0), (3.8e8, 0.67), (9.2e6, 0.0), (9.1e6, 0.8)]
    assert label_lifts(points, log=True) == [0, 1, 0, 0, 2, 0]
    assert label_lifts([(1.0, 0.0), (100.0, 0.0)], log=False) == [0, 0]
