"""Recall tasks on a tiny random Llama: the tidy schema, determinism, the model's window, and that
they run under the edits a backend keeps on."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from attnprobe.analyses import recall
from attnprobe.hooks.edits import zero_heads
from attnprobe.hooks.errors import AttnprobeError
from attnprobe.hooks.backends.native import NativeBackend

from test_retrieval import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _check_schema(table: pd.DataFrame, task: str, rows: int) -> None:
    assert list(table.columns[:6]) == recall.COLUMNS
    assert len(table) == rows
    assert (table["task"] == task).all() and (table["variant"] == "v").all()
    assert table["correct"].map(type).eq(bool).all()


def test_passkey_schema_and_determinism(model):
    run = lambda seed: recall.passkey(model, lengths=[60, 120], depths=[0.0, 1.0], samples=1, seed=seed, variant="v")
    table = run(0)
    _check_schema(table, "passkey", 2 * 2)
    assert table["answer"].str.fullmatch(r"\d{5}").all()
    assert table["answer"].nunique() > 1
    pd.testing.assert_frame_equal(table, run(0))
    assert not table["answer"].equals(run(1)["answer"])


def test_niah_schema(model):
    table = recall.niah(model, lengths=[100], depths=[0.5], needles=2, variant="v")
    _check_schema(table, "niah", 2)
    assert set(table["sample"]) == {0, 1}
    assert table["answer"].tolist() == [n["answer"] for n in recall.load_needles()[:2]]


def test_kv_recall_schema_and_determinism(model):
    table = recall.kv_recall(model, n_pairs=(2, 5), samples=2, seed=7, variant="v")
    _check_schema(table, "kv_recall", 4)
    assert table["depth"].between(0, 1).all() and set(table["length"]) == {2, 5}
    pd.testing.assert_frame_equal(table, recall.kv_recall(model, n_pairs=(2, 5), samples=2, seed=7, variant="v"))


def test_copying_scores_exact_match_and_token_accuracy(model):
    table = recall.copying(model, lengths=(4, 8), samples=2, seed=0, variant="v")
    _check_schema(table, "copying", 4)
    assert table["token_accuracy"].between(0, 1).all()
    assert (table["correct"] == (table["token_accuracy"] == 1.0)).all()
    pd.testing.assert_frame_equal(table, recall.copying(model, lengths=(4, 8), samples=2, seed=0, variant="v"))


def test_perplexity_runs_under_active_edits(model):
    base = recall.perplexity(model, n_tokens=300, chunk=128, variant="v")
    assert list(base.columns) == ["variant", "task", "chunk", "tokens", "nll", "perplexity"]
    assert base["tokens"].tolist() == [127, 127, 43]
    value = recall.overall_perplexity(base)
    assert math.isfinite(value) and value > 1
    backend = NativeBackend(model)
    try:
        with backend.patched([zero_heads(layer, [0, 1, 2, 3]) for layer in range(2)]):
            ablated = recall.overall_perplexity(recall.perplexity(model, n_tokens=300, chunk=128))
    finally:
        backend.close()
    assert abs(ablated - value) > 1e-3
    assert recall.overall_perplexity(recall.perplexity(model, n_tokens=300, chunk=128)) == pytest.approx(value)


def test_bos_option_changes_perplexity(model):
    without = recall.overall_perplexity(recall.perplexity(model, n_tokens=200, chunk=100, bos=False))
    with_bos = recall.overall_perplexity(recall.perplexity(model, n_tokens=200, chunk=100, bos=True))
    assert without != pytest.approx(with_bos)


def test_lengths_beyond_the_window_are_a_user_error():
    small = tiny_model(max_positions=64)
    with pytest.raises(AttnprobeError, match="window"):
        recall.passkey(small, lengths=[100], depths=[0.5], samples=1)
    with pytest.raises(AttnprobeError, match="window"):
        recall.copying(small, lengths=[40], samples=1)
