"""Recall tasks on a tiny random Llama: the tidy schema, determinism, the model's window, and that
they run under the edits a backend keeps on."""
from __future__ import annotations

import pandas as pd
import pytest

from attnprobe.analyses import recall
from attnprobe.hooks.edits import zero_heads
from attnprobe.errors import AttnprobeError
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
    table = recall.niah(model, lengths=[100], depths=[0.5], variant="v")
    needles = recall.evaluation_needles()
    _check_schema(table, "niah", len(needles))
    assert set(table["sample"]) == set(needles) and min(needles) == recall.DEFAULT_NEEDLES  # none the census ranks with
    assert table["answer"].tolist() == [recall.load_needles()[i]["answer"] for i in needles]


def test_kv_recall_schema_and_determinism(model):
    table = recall.kv_recall(model, n_pairs=(16, 20), samples=2, seed=7, variant="v")
    _check_schema(table, "kv_recall", 4)
    assert table["depth"].between(0, 1).all() and set(table["length"]) == {16, 20}
    pd.testing.assert_frame_equal(table, recall.kv_recall(model, n_pairs=(16, 20), samples=2, seed=7, variant="v"))


def test_copying_schema_and_determinism(model):
    table = recall.copying(model, lengths=(4, 8), samples=2, seed=0, variant="v")
    _check_schema(table, "copying", 4)
    assert table["token_accuracy"].between(0, 1).all()
    pd.testing.assert_frame_equal(table, recall.copying(model, lengths=(4, 8), samples=2, seed=0, variant="v"))


def test_lengths_beyond_the_window_are_a_user_error():
    small = tiny_model(max_positions=64)
    with pytest.raises(AttnprobeError, match="window"):
        recall.passkey(small, lengths=[100], depths=[0.5], samples=1)
    with pytest.raises(AttnprobeError, match="window"):
        recall.copying(small, lengths=[40], samples=1)


# ---- a correct answer is scored correct ----------------------------------------------------------

def test_copying_scores_a_model_that_copies_as_correct():
    """The planted model copies repeated text verbatim: every copied token is right."""
    from planted import planted_model

    table = recall.copying(planted_model(), lengths=(6, 10), samples=3, seed=0, variant="v")
    assert (table["token_accuracy"] == 1.0).all() and table["correct"].all()


def test_copying_scores_a_broken_copier_as_wrong():
    from planted import COPY_HEAD, planted_model

    model = planted_model()
    backend = NativeBackend(model)
    try:
        with backend.patched([zero_heads(COPY_HEAD[0], [COPY_HEAD[1]])]):
            table = recall.copying(model, lengths=(6, 10), samples=3, seed=0)
    finally:
        backend.close()
    assert table["token_accuracy"].max() < 0.5 and not table["correct"].any()


def _oracle(model, right: bool):
    """A stand-in for greedy decoding that answers from the prompt: the key or value asked for (or a wrong one)."""
    import re

    def decode(_, prompt, max_new_tokens=8, **kwargs):
        text = model.tokenizer.decode(prompt)
        if "pass key" in text:
            answer = re.search(r"The pass key is (\d+)", text).group(1)
        else:
            key = text.rstrip(":").split("\n")[-1]
            answer = re.search(rf"^{key}: (\d+)$", text, re.M).group(1)
        answer = answer if right else str(int(answer) + 1)
        return model.tokenizer(" " + answer + ".").input_ids

    return decode


@pytest.mark.parametrize("right", [True, False])
def test_passkey_and_kv_recall_score_the_right_answer_correct(model, monkeypatch, right):
    monkeypatch.setattr(recall, "greedy_decode", _oracle(model, right))
    passkey = recall.passkey(model, lengths=[200], depths=[0.0, 0.5], samples=2)
    kv = recall.kv_recall(model, n_pairs=(16,), samples=3)
    assert passkey["correct"].tolist() == [right] * 4
    assert kv["correct"].tolist() == [right] * 3


def test_kv_recall_asks_for_a_pair_beyond_the_window(model):
    """The queried pair's line ends at least BEYOND_WINDOW tokens before the query: a windowed hybrid cannot see it."""
    seen = []

    def capture(_, prompt, max_new_tokens=8, **kwargs):
        seen.append(model.tokenizer.decode(prompt))
        return [ord("1")]

    import attnprobe.analyses.recall as module
    original, module.greedy_decode = module.greedy_decode, capture
    try:
        recall.kv_recall(model, n_pairs=(16, 32), samples=4)
    finally:
        module.greedy_decode = original
    for text in seen:  # CharTokenizer: one token per character
        key = text.split("\n")[-1].rstrip(":")
        line = next(l for l in text.split("\n")[1:-1] if l.startswith(key + ":"))
        assert len(text) - (text.index(line + "\n") + len(line) + 1) >= recall.BEYOND_WINDOW
    with pytest.raises(AttnprobeError, match="at least 16"):
        recall.kv_recall(model, n_pairs=(2,), samples=1)
