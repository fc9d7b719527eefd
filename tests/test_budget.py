"""The selector x budget sweep on a tiny model with a planted census table: cells, intervals, bytes,
overlaps, needle shares, resuming, the CLI command and the budget figure."""
import dataclasses
import subprocess
import sys

import pandas as pd
import pytest
from attnprobe.analyses.experiments import budget
from attnprobe.analyses.presentation import figures
from attnprobe.hooks.backends import make_backend
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import load_model
from tiny_hf import tiny_model_dir

PLANTED_TOP = (1, 3)  # the planted census's best retrieval head


def small_sizes(**overrides):
    return budget.BudgetSizes.quick(**{"budgets": (0.25, 0.5), "selectors": ("retrieval", "random"), "seeds": 2,
                                       "kinds": ("sink+window:sinks=2,window=8",), "sparse": ("oracle-topk:k=8",),
                                       "tasks": ("passkey",), **overrides})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    path = tiny_model_dir(root)
    census = root / "census"
    census.mkdir()
    pd.DataFrame([{"layer": l, "head": h, "kv_head": h // 2, "retrieval_score": 0.9 if (l, h) == PLANTED_TOP else 0.01 * h}
                  for l in range(2) for h in range(4)]).to_parquet(census / "heads.parquet", index=False)
    model = load_model(str(path))
    return path, census, model, make_backend("native", model)


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    _, census, model, backend = tiny
    out = tmp_path_factory.mktemp("sweep")
    return out, budget.run_sweep(model, backend, out, small_sizes(), census)


def test_sweep_writes_every_cell_with_intervals_and_bytes(swept):
    out, tables = swept
    table = tables["budget"]
    for name in ("rankings", "budget", "budget_samples", "overlap", "needle_keep"):
        assert (out / f"{name}.parquet").exists()
    cells = table[["kind", "selector", "seed", "budget"]].drop_duplicates()
    assert len(cells) == 1 + 1 + 1 + 2 * (1 + 2)  # original, all replaced, one sparse row, 2 budgets x 3 rankings
    assert (table["ci_low"] <= table["accuracy"]).all() and (table["accuracy"] <= table["ci_high"]).all()
    original = table[table["selector"] == "all-exact"].iloc[0]
    replaced = table[table["selector"] == "none-exact"].iloc[0]
    assert original["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2 and original["fixed_bytes"] == 0  # 2 layers x 2 KV heads x K,V x d 16 x 2 B
    # every KV head (2 layers x 2) keeps sinks + window once for its two query heads, K and V, d 16, 2 B
    assert replaced["kv_bytes_per_token"] == 0 and replaced["fixed_bytes"] == 4 * 2 * 16 * (2 + 8) * 2
    half = table[(table["selector"] == "retrieval") & (table["budget"] == 0.5)].iloc[0]
    assert half["units"] == 2 and half["exact_heads"] == 4 and half["kv_bytes_per_token"] == original["kv_bytes_per_token"] / 2
    sparse = table[table["selector"] == "sparse"].iloc[0]
    # sparse rules read fewer keys, they keep them all, once per KV head as the original does
    assert sparse["kv_bytes_per_token"] == original["kv_bytes_per_token"]


def test_rankings_follow_the_census_and_overlaps_compare_them(swept):
    _, tables = swept
    rankings, overlap = tables["rankings"], tables["overlap"]
    retrieval = rankings[rankings["selector"] == "retrieval"].sort_values("rank")
    assert (retrieval.iloc[0]["layer"], retrieval.iloc[0]["unit"]) == (1, PLANTED_TOP[1] // 2)
    assert set(overlap["budget"]) == {0.25, 0.5} and overlap["jaccard"].between(0, 1).all()
    assert len(overlap) == 2 * 3  # 3 pairs among retrieval, random 0, random 1 at each budget


def test_needle_shares_are_shares_and_the_oracle_keeps_its_budget(swept):
    _, tables = swept
    needle = tables["needle_keep"]
    assert set(needle["query"]) == {"answer step", "last prefill query"}
    assert needle[["kept_share", "needle_share", "answer_share"]].stack().between(0, 1).all()
    assert (needle["kept_share"] < 1).all()  # 8 + 4 sink keys of a 128-token prompt


def test_a_rerun_resumes_without_evaluating_and_a_time_limit_skips_cells(tiny, swept, monkeypatch, tmp_path):
    _, census, model, backend = tiny
    out, tables = swept

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was evaluated again")

    monkeypatch.setattr(budget, "evaluate", refuse)
    again = budget.run_sweep(model, backend, out, small_sizes(), census)
    pd.testing.assert_frame_equal(again["budget"], tables["budget"])
    monkeypatch.undo()
    limited = budget.run_sweep(model, backend, tmp_path, small_sizes(sparse=()), census, time_limit=0)
    assert limited["budget"].empty
    assert budget.read_json(tmp_path / "manifest.json")["cells_skipped_for_time"] == 1 + 1 + 2 * 3


def test_a_fitted_kind_and_split_runs_share_one_directory(tiny, tmp_path):
    """The GPU driver's layout: processes with different selectors (one with a fitted linear kind) write
    cells into one run directory, and a run over every selector with no time left assembles them all."""
    _, census, model, backend = tiny
    linear = small_sizes(kinds=("hedgehog",), selectors=("fit",), budgets=(0.5,), sparse=())
    streaming = small_sizes(selectors=("retrieval",), sparse=())
    first = budget.run_sweep(model, backend, tmp_path, linear, census)["budget"]
    assert (tmp_path / "fits").exists() and set(first["kind"]) == {"none", "hedgehog"}
    fit_cell = first[first["selector"] == "fit"]
    assert len(fit_cell) == 1 and fit_cell.iloc[0]["units"] == 2 and fit_cell.iloc[0]["fixed_bytes"] > 0
    budget.run_sweep(model, backend, tmp_path, streaming, census)
    both = small_sizes(kinds=("sink+window:sinks=2,window=8", "hedgehog"), selectors=("retrieval", "fit"), budgets=(0.5,),
                       sparse=())
    assembled = budget.run_sweep(model, backend, tmp_path, both, census, time_limit=0)["budget"]
    cells = set(map(tuple, assembled[["kind", "selector"]].drop_duplicates().values))
    assert {("hedgehog", "fit"), ("sink+window:sinks=2,window=8", "retrieval"), ("none", "all-exact")} <= cells
    # not run by either process: counted as skipped, not invented
    assert ("hedgehog", "retrieval") not in cells
    assert budget.read_json(tmp_path / "manifest.json")["cells_skipped_for_time"] == 2


def test_budgets_run_coarse_first():
    assert budget.coarse_first(budget.BUDGETS) == [0.25, 0.125, 0.75, 0.0625, 0.5]
    assert sorted(budget.coarse_first([0.3, 0.1, 0.2])) == [0.1, 0.2, 0.3]


def test_bad_specs_and_missing_census_are_user_errors(tiny, tmp_path):
    _, _, model, backend = tiny
    with pytest.raises(AttnprobeError, match="unknown kernel"):
        budget.parse_spec("streaming:4+64")
    with pytest.raises(AttnprobeError, match="no option"):
        budget.parse_spec("sink+window:sink=4")
    with pytest.raises(AttnprobeError, match="integer"):
        budget.parse_spec("sink+window:sinks=four")
    with pytest.raises(AttnprobeError, match="--from"):
        budget.run_sweep(model, backend, tmp_path, small_sizes(), None)


def test_one_kv_head_per_layer_is_said(tiny):
    info = dataclasses.replace(tiny[2].info, n_kv_heads=1)
    assert any("whole layers" in note for note in budget.notes(info, "kv"))
    assert not any("whole layers" in note for note in budget.notes(tiny[2].info, "kv"))


def test_winners_pool_the_random_draws(swept):
    _, tables = swept
    best = budget.winners(tables["budget"])
    assert set(best["budget"]) == {0.25, 0.5} and len(best) == 2
    assert all(set(s.split(" = ")) <= {"retrieval", "random"} for s in best["selector"])


def test_budget_figure_draws_lines_bands_and_references(swept):
    _, tables = swept
    figure = figures.budget_curve(tables["budget"], "passkey")
    axes = figure.axes[0]
    labels = axes.get_legend_handles_labels()[1]
    assert any("retrieval" in label for label in labels) and any("random" in label for label in labels)
    assert any("original" in label for label in labels)
    assert axes.collections  # the random band and the intervals


def test_cli_budget_runs_on_the_tiny_model(tiny, tmp_path):
    path, census, _, _ = tiny
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "attnprobe.analyses.cli", "budget", "--model", str(path), "--from", str(census),
                             "--quick", "--selectors", "retrieval", "--budgets", "0.5", "--kinds", "sink+window:sinks=2,window=8",
                             "--sparse", "", "--tasks", "passkey", "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "best selector per budget" in result.stdout and (out / "budget.parquet").exists()
    table = pd.read_parquet(out / "budget.parquet")
    assert set(table["selector"]) == {"all-exact", "none-exact", "retrieval"}
    bad = subprocess.run([sys.executable, "-m", "attnprobe.analyses.cli", "budget", "--model", str(path), "--quick",
                          "--selectors", "retrieval", "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600, check=False)
    assert bad.returncode == 2 and "--from" in bad.stderr


def test_the_quest_row_keeps_layers_0_and_1_dense_as_its_reference():
    """Quest's reference leaves the first two layers dense; the other rules replace every layer."""
    import types

    info = types.SimpleNamespace(n_layers=4, n_heads=4, n_kv_heads=2)
    sizes = small_sizes(sparse=("quest:page=4,pages=4", "oracle-topk:k=8"), kinds=())
    rows = {cell.kind: cell for cell in budget.plan(sizes, pd.DataFrame(columns=["selector", "seed"]), info)
            if cell.selector == "sparse"}
    assert sorted(rows["quest:page=4,pages=4"].units) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows["oracle-topk:k=8"].units == []


def test_a_planted_copier_recalls_with_its_head_exact_and_not_with_it_replaced(tmp_path):
    """The sweep's cells on the planted copier: keeping the one head the census ranks first exact (a budget of
    1 of 8 heads) copies every token, replacing every head by a 1 + 4 token window copies none."""
    from attnprobe.analyses import tasks
    from attnprobe.analyses.experiments import selectors
    from attnprobe.hooks.backends.native import NativeBackend
    from planted import COPY_HEAD, planted_model

    model = planted_model()
    backend = NativeBackend(model)
    census = tmp_path / "census"
    census.mkdir()
    pd.DataFrame([{"layer": l, "head": h, "retrieval_score": float((l, h) == COPY_HEAD)} for l in range(2) for h in range(4)]
                 ).to_parquet(census / "heads.parquet", index=False)
    kind = "sink+window:sinks=1,window=4"
    sizes = small_sizes(budgets=(1 / 8,), selectors=("retrieval",), unit="head", kinds=(kind,), sparse=())
    rankings = budget.selector_rankings(model, backend, tmp_path, sizes, census, {kind: "sink+window"}, lambda m: None)
    cells = {cell.selector: cell for cell in budget.plan(sizes, rankings, model.info)}
    assert cells["retrieval"].units == [COPY_HEAD]
    for selector, accuracy in (("all-exact", 1.0), ("retrieval", 1.0), ("none-exact", 0.0)):
        cell = cells[selector]
        keep = selectors.heads_of(model.info, "head", cell.units)
        edits = [] if cell.kind == "none" else budget.kind_edits(model, "sink+window", {"sinks": 1, "window": 4}, keep, 64)
        with backend.patched(edits):
            copied = tasks.evaluate(model, "copying", (12,), 4)
        assert copied["token_accuracy"].tolist() == [accuracy] * 4, selector
