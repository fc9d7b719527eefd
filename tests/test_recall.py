"""The matrix's four recall tasks through the registry on a tiny random Llama: the tidy schema,
determinism, the model's window, that they run under the edits a backend keeps on, and the key-value
pair asked for lies beyond a hybrid's window."""
from __future__ import annotations

import pandas as pd
import pytest

from attnprobe.analyses import tasks
from attnprobe.analyses.tasks import Setting, registry
from attnprobe.analyses.tasks.prompts import BEYOND_WINDOW
from attnprobe.errors import AttnprobeError

from test_retrieval import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _check_schema(table: pd.DataFrame, task: str, rows: int) -> None:
    assert list(table.columns[:6]) == tasks.COLUMNS
    assert len(table) == rows
    assert (table["task"] == task).all() and (table["variant"] == "v").all()
    assert table["correct"].map(type).eq(bool).all()


def test_passkey_schema_and_determinism(model):
    run = lambda seed: tasks.evaluate(model, "passkey", [60, 120], 2, seed=seed, variant="v",  # noqa: E731
                                      setting=Setting(depths=(0.0, 1.0)))
    table = run(0)
    _check_schema(table, "passkey", 2 * 2)
    assert set(table["depth"]) == {0.0, 1.0}
    assert table["answer"].str.fullmatch(r"\d{5}").all() and table["answer"].nunique() > 1
    pd.testing.assert_frame_equal(table, run(0))
    assert not table["answer"].equals(run(1)["answer"])


def test_niah_schema(model):
    table = tasks.evaluate(model, "niah", [100], 8, variant="v", setting=Setting(depths=(0.5,)))
    needles = tasks.pools.evaluation_needles()
    _check_schema(table, "niah", len(needles))
    assert set(table["sample"]) == set(needles) and min(needles) == registry.DEFAULT_NEEDLES  # none the census ranks with
    assert table["answer"].tolist() == [tasks.pools.load_needles()[i]["answer"] for i in needles]
    with pytest.raises(AttnprobeError, match="evaluation needles"):
        tasks.evaluate(model, "niah", [100], 9, setting=Setting(depths=(0.5,)))


def test_kv_recall_schema_and_determinism(model):
    table = tasks.evaluate(model, "kv_recall", (16, 20), 2, seed=7, variant="v")
    _check_schema(table, "kv_recall", 4)
    assert table["depth"].between(0, 1).all() and set(table["length"]) == {16, 20}
    pd.testing.assert_frame_equal(table, tasks.evaluate(model, "kv_recall", (16, 20), 2, seed=7, variant="v"))


def test_copying_schema_and_determinism(model):
    table = tasks.evaluate(model, "copying", (4, 8), 2, variant="v")
    _check_schema(table, "copying", 4)
    assert table["token_accuracy"].between(0, 1).all()
    pd.testing.assert_frame_equal(table, tasks.evaluate(model, "copying", (4, 8), 2, variant="v"))


def test_lengths_beyond_the_window_are_a_user_error():
    small = tiny_model(max_positions=64)
    with pytest.raises(AttnprobeError, match="window"):
        tasks.evaluate(small, "passkey", [100], 1, setting=Setting(depths=(0.5,)))
    with pytest.raises(AttnprobeError, match="window"):
        tasks.evaluate(small, "copying", [40], 1)


def test_kv_recall_asks_for_a_pair_beyond_the_window(model):
    """The queried pair's line ends at least BEYOND_WINDOW tokens before the query: a windowed hybrid cannot see it."""
    for sample in tasks.build("kv_recall", 4, 16, 0, model.tokenizer, None) + tasks.build("kv_recall", 4, 32, 0, model.tokenizer, None):
        text = model.tokenizer.decode(sample.prompt_ids)  # CharTokenizer: one token per character
        key = text.split("\n")[-1].rstrip(":")
        line = next(l for l in text.split("\n")[1:-1] if l.startswith(key + ":"))  # noqa: E741
        assert line == f"{key}: {sample.answers[0]}"
        assert len(text) - (text.index(line + "\n") + len(line) + 1) >= BEYOND_WINDOW
    with pytest.raises(AttnprobeError, match="at least 16"):
        tasks.build("kv_recall", 1, 2, 0, model.tokenizer, None)
