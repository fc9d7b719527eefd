"""Selectors of the heads that stay exact, on the planted model whose mechanisms are known."""
import dataclasses

import pandas as pd
import pytest
from attnprobe.analyses.experiments import selectors
from attnprobe.hooks.backends import make_backend
from attnprobe.errors import AttnprobeError
from planted import COPY_HEAD, N_HEADS, N_KV, planted_model


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, make_backend("native", model)


def test_kv_units_keep_their_query_heads_together_and_take_the_maximum(planted):
    info = planted[0].info
    assert selectors.unit_count(info, "kv") == 2 * N_KV and selectors.unit_count(info, "head") == 2 * N_HEADS
    assert selectors.heads_of(info, "kv", [(1, 0)]) == {(1, 0), (1, 1)}
    scores = pd.DataFrame({"layer": [0, 0, 0, 0], "head": [0, 1, 2, 3], "score": [0.1, 0.7, 0.2, 0.0]})
    units = selectors.to_units(info, "kv", scores)
    assert units[units["layer"] == 0]["score"].tolist() == [0.7, 0.2]


def test_one_kv_head_per_layer_means_kv_selection_picks_layers(planted):
    info = dataclasses.replace(planted[0].info, n_kv_heads=1)
    assert selectors.all_units(info, "kv") == [(0, 0), (1, 0)]
    assert selectors.heads_of(info, "kv", [(1, 0)]) == {(1, h) for h in range(N_HEADS)}


def test_budget_counts_round_and_refuse_nonsense():
    assert [selectors.budget_count(f, 90) for f in (0.0625, 0.125, 0.25, 0.5, 0.75)] == [6, 11, 22, 45, 68]
    assert selectors.budget_count(0.0625, 6) == 1
    with pytest.raises(AttnprobeError, match="fractions"):
        selectors.budget_count(25, 90)


def test_razor_ranks_the_planted_induction_head_first(planted):
    model, backend = planted
    induction, echo = selectors.razor_scores(model, backend, length=12, batch=2)
    order = selectors.razor_order(selectors.to_units(model.info, "head", induction), selectors.to_units(model.info, "head", echo))
    assert order[0] == COPY_HEAD
    assert sorted(order) == selectors.all_units(model.info, "head")


def test_razor_order_takes_echo_and_induction_in_proportion():
    units = [(0, u) for u in range(30)]
    induction = pd.DataFrame({"layer": 0, "unit": range(30), "score": [30 - u for u in range(30)]})
    echo = pd.DataFrame({"layer": 0, "unit": range(30), "score": [u for u in range(30)]})  # the reverse order
    order = selectors.razor_order(induction, echo)
    assert sorted(order) == units
    first15 = order[:15]
    assert (0, 29) in first15 and sum(u >= 15 for _, u in first15) == 1  # one echo pick in 15: 14 % + 1 %


def test_duo_gates_keep_the_head_the_passkeys_need(planted):
    model, backend = planted
    config = selectors.DuoConfig(lengths=(160,), passkeys=1, passkey_words=3, steps=8, sinks=1, window=4, lr=0.1)
    gates = selectors.duo_gates(model, backend, config)
    by_unit = {(r.layer, r.unit): r.score for r in gates.itertuples()}
    copy_kv = (COPY_HEAD[0], COPY_HEAD[1] // (N_HEADS // N_KV))
    assert all(0 <= g <= 1 for g in by_unit.values())
    others = [g for unit, g in by_unit.items() if unit != copy_kv]
    assert by_unit[copy_kv] > max(others)  # the L1 penalty pulls down the gates nothing needs
    assert max(others) < 1.0
    assert not any(p.requires_grad for p in model.hf.parameters())


def test_fit_errors_grow_with_how_far_back_a_head_reads(planted):
    model, backend = planted
    errors = selectors.fit_errors(model, backend, "sink+window", tokens=96, sinks=1, window=2)
    error = {(r.layer, r.head): r.score for r in errors.itertuples()}
    assert error[(1, 2)] < 1e-8 and error[(0, 3)] < 1e-8  # heads of a KV head whose values are 0
    assert error[COPY_HEAD] > 10 * error[(0, 0)]  # the copy head reads far back, the previous-token head does not


def test_random_orders_differ_by_seed_and_jaccard_is_symmetric(planted):
    info = planted[0].info
    a, b = selectors.random_order(info, "head", 0), selectors.random_order(info, "head", 1)
    assert sorted(a) == sorted(b) and a != b
    rankings = pd.concat([selectors.ranking_rows("random", 0, a, None), selectors.ranking_rows("random", 1, b, None),
                          selectors.ranking_rows("same", 0, a, None)])
    overlap = selectors.overlap_table(rankings, (0.25, 1.0), len(a))
    full = overlap[overlap["budget"] == 1.0]
    assert (full["jaccard"] == 1.0).all()
    same = overlap[(overlap["selector_a"] == "random") & (overlap["seed_a"] == 0) & (overlap["selector_b"] == "same")]
    assert (same["jaccard"] == 1.0).all()
    assert selectors.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_retrieval_scores_need_a_census(tmp_path):
    with pytest.raises(AttnprobeError, match="--from"):
        selectors.retrieval_scores(None)
    with pytest.raises(AttnprobeError, match="census"):
        selectors.retrieval_scores(tmp_path)


def test_fit_errors_read_the_fit_text_never_the_perplexity_text(planted):
    from attnprobe.probe import texts

    model, backend = planted
    with texts.recording() as used:
        selectors.fit_errors(model, backend, "sink+window", tokens=64, sinks=1, window=2)
    assert {record["range"] for record in used} == {"fit"}
