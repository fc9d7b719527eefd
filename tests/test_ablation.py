"""Ablations on the planted model, where each head's job is known, and ACT calibration by its definition."""
import pandas as pd
import pytest
import torch

from attnprobe.analyses.experiments import ablation
from attnprobe.analyses.experiments.ablation import DEFAULT_DRAWS, ablation_edits, calibrate_sinks, masking_sweep, wilson_interval
from attnprobe.analyses.experiments.selection import parse_heads
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site

from planted import BOS, COPY_HEAD, PREVIOUS_HEAD, SINK_HEAD, planted_model


def copy_task(model, label):
    """Teacher-forced copying of 10 random repeated strings: correct if the second copy is predicted."""
    rows = []
    for sample in range(10):
        g = torch.Generator().manual_seed(sample)
        half = (torch.randperm(30, generator=g)[:12] + 2).tolist()
        ids = torch.tensor([[BOS] + half + half])
        with torch.no_grad():
            logits = model.hf(input_ids=ids, use_cache=False).logits[0]
        predicted = logits[13:24].argmax(-1)
        rows.append({"variant": label, "task": "copying", "sample": sample, "correct": bool((predicted == ids[0, 14:25]).all())})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, NativeBackend(model)


@pytest.mark.parametrize("mode", ["zero", "uniform", "mean"])
def test_masking_the_copy_head_or_its_feeder_breaks_copying(planted, mode):
    model, backend = planted
    assert copy_task(model, "x")["correct"].all()
    for head in (COPY_HEAD, PREVIOUS_HEAD):
        with backend.patched(ablation_edits(model, backend, [head], mode)):
            assert not copy_task(model, "x")["correct"].any()
    with backend.patched(ablation_edits(model, backend, [SINK_HEAD, (0, 3)], mode)):
        assert copy_task(model, "x")["correct"].all()


def test_calibration_gives_sinks_exactly_beta_and_their_loss_to_the_other_keys():
    torch.manual_seed(0)
    from test_effective_attention import _tiny

    model = _tiny()
    backend = NativeBackend(model)
    ids = torch.randint(0, 64, (1, 48))
    before, after = Keep(), Keep()
    backend.run(ids, reads={(1, Site.PATTERN): before})
    threshold = 0.02  # low, so that this random model has some "hidden sinks"
    backend.run(ids, reads={(1, Site.PATTERN): after}, edits=[calibrate_sinks(1, [1, 2], beta=0.4, threshold=threshold)])
    original, calibrated = before.result()[0], after.result()[0]
    for head in (1, 2):
        seen_by = torch.arange(48, 0, -1).float()
        alpha = original[head].sum(0) / seen_by
        sinks = (alpha > threshold) & (seen_by >= 16)
        sinks[0] = False
        assert sinks.any()
        a, c = original[head], calibrated[head]
        # ACT: a sink keeps exactly beta of its weight ...
        assert torch.allclose(c[:, sinks], 0.4 * a[:, sinks], atol=1e-6)
        # ... and the mass removed goes to the other keys in proportion to their weights
        removed = 0.6 * a[:, sinks].sum(-1, keepdim=True)
        others = ~sinks
        expected = a[:, others] * (1 + removed / a[:, others].sum(-1, keepdim=True))
        assert torch.allclose(c[:, others], expected, atol=1e-6)
        assert torch.allclose(c.sum(-1), torch.ones(48), atol=1e-5)
    assert torch.equal(calibrated[[0, 3]], original[[0, 3]])


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490, abs=1e-3) and high == pytest.approx(0.943, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_sweep_top_heads_hurt_more_than_random(planted, tmp_path):
    """Ranked: the copy head first, its feeder (the previous-token head) second. Random heads are drawn
    outside the top 2, so they never break copying: top-1 masking must fall below every random draw,
    with Wilson intervals that do not overlap."""
    model, backend = planted
    score = {COPY_HEAD: 1.0, PREVIOUS_HEAD: 0.5}
    heads = pd.DataFrame([{"layer": l, "head": h, "retrieval_score": score.get((l, h), 0.0)} for l in range(2) for h in range(4)])
    heads.to_parquet(tmp_path / "heads.parquet")
    summary, rows = masking_sweep(model, backend, tmp_path, ks=[1], task=copy_task, exclude_top=2)
    by = {s: summary[summary["selection"] == s] for s in ("none", "top", "random", "random-pooled")}
    assert len(by["random"]) == DEFAULT_DRAWS == 10
    drawn = rows[rows["selection"] == "random"]["variant"].unique()
    assert len(drawn) == 10
    top, pooled = by["top"].iloc[0], by["random-pooled"].iloc[0]
    assert by["none"]["accuracy"].item() == 1.0
    assert top["accuracy"] < by["random"]["accuracy"].min()
    assert pooled["n"] == 10 * top["n"] and top["ci_high"] < pooled["ci_low"]


def test_an_interrupted_sweep_resumes_from_its_saved_cells(planted, tmp_path, monkeypatch):
    """Each finished configuration is saved; after a crash in the fourth, the rerun evaluates only what is
    missing and equals an uninterrupted sweep. A folder holding another sweep's cells is refused."""
    model, backend = planted
    score = {COPY_HEAD: 1.0, PREVIOUS_HEAD: 0.5}
    pd.DataFrame([{"layer": l, "head": h, "retrieval_score": score.get((l, h), 0.0)} for l in range(2) for h in range(4)]
                 ).to_parquet(tmp_path / "heads.parquet")
    whole, _ = masking_sweep(model, backend, tmp_path, ks=[1], draws=4, task=copy_task, exclude_top=2)
    evaluated = []

    def crashing(m, label):
        if len(evaluated) == 3:
            raise KeyboardInterrupt
        evaluated.append(label)
        return copy_task(m, label)

    settings = {"ks": [1], "draws": 4}
    with pytest.raises(KeyboardInterrupt):
        masking_sweep(model, backend, tmp_path, ks=[1], draws=4, task=crashing, exclude_top=2,
                      cells=ablation.SweepCells(tmp_path / "cells", settings))
    assert evaluated == ["original", "top-1", "random-1-s0"]
    evaluated.clear()
    resumed, rows = masking_sweep(model, backend, tmp_path, ks=[1], draws=4, task=lambda m, label: evaluated.append(label)
                                  or copy_task(m, label), exclude_top=2, cells=ablation.SweepCells(tmp_path / "cells", settings))
    assert evaluated == ["random-1-s1", "random-1-s2", "random-1-s3"]
    pd.testing.assert_frame_equal(resumed, whole)
    assert len(rows) == 6 * 10 and "response" not in rows
    with pytest.raises(AttnprobeError, match="other settings"):
        ablation.SweepCells(tmp_path / "cells", {"ks": [2], "draws": 4})


def test_sweep_random_heads_never_come_from_the_excluded_top(planted, tmp_path, monkeypatch):
    from attnprobe.analyses.experiments import ablation
    model, backend = planted
    heads = pd.DataFrame([{"layer": l, "head": h, "retrieval_score": float(8 - 4 * l - h)} for l in range(2) for h in range(4)])
    heads.to_parquet(tmp_path / "heads.parquet")
    masked = []
    real = ablation.ablation_edits
    monkeypatch.setattr(ablation, "ablation_edits", lambda m, b, chosen, *a, **k: masked.append(list(chosen)) or real(m, b, chosen, *a, **k))
    ablation.masking_sweep(model, backend, tmp_path, ks=[2], draws=12, task=lambda m, label: pd.DataFrame(
        [{"variant": label, "task": "t", "correct": True}]), exclude_top=4)
    top4 = {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert masked[0] == [(0, 0), (0, 1)]  # top-2
    assert all(not set(drawn) & top4 for drawn in masked[1:]) and len(masked) == 13
    with pytest.raises(AttnprobeError, match="exclude-top"):
        ablation.masking_sweep(model, backend, tmp_path, ks=[2], task=copy_task, exclude_top=7)


def test_sweep_evaluates_on_needles_the_census_did_not_rank_with(tmp_path):
    import json

    from attnprobe.analyses.experiments.ablation import recall_task
    from attnprobe.probe import texts
    from test_retrieval import tiny_model

    (tmp_path / "manifest.json").write_text(json.dumps({"config": {"needles": 3}}))
    with pytest.raises(AttnprobeError, match="7 samples .* --allow-small"):  # 7 needles: intervals over 0.5 wide
        recall_task("niah", [120], [0.5], run_dir=tmp_path)
    with texts.recording() as used:
        table = recall_task("niah", [120], [0.5], run_dir=tmp_path, allow_small=True)(tiny_model(), "x")
    assert sorted(set(table["sample"])) == list(range(3, 10))
    assert {r["range"] for r in used} == {"evaluation"}
    (tmp_path / "manifest.json").write_text(json.dumps({"config": {"needles": 10}}))
    with pytest.raises(AttnprobeError, match="none is left"):  # every needle ranked heads: nothing to evaluate on
        recall_task("niah", [120], [0.5], run_dir=tmp_path)


def test_random_baseline_interval_counts_the_spread_between_draws():
    """Draws at 0.2, 0.5 and 0.8 over 100 samples each: a Wilson interval of the 300 pooled samples is
    about +-0.06; the t interval over the three draws is far wider, as the draws disagree."""
    from attnprobe.analyses.experiments.ablation import _draws_row

    rows = pd.DataFrame([{"seed": seed, "correct": i < 100 * share} for seed, share in enumerate((0.2, 0.5, 0.8))
                         for i in range(100)])
    row = _draws_row("niah", 4, rows)
    pooled_low, pooled_high = wilson_interval(150, 300)
    assert row["accuracy"] == pytest.approx(0.5) and row["n"] == 300
    assert row["ci_low"] < pooled_low - 0.3 and row["ci_high"] > pooled_high + 0.3
    assert row["interval"] == "t over 3 draws"


def test_selection_errors_name_the_valid_range(planted, tmp_path):
    model, _ = planted
    with pytest.raises(AttnprobeError, match="layers 0-1"):
        parse_heads("5.0", model.info)
    with pytest.raises(AttnprobeError, match="heads 0-3"):
        parse_heads("1.9", model.info)
    with pytest.raises(AttnprobeError, match="--from"):
        parse_heads("top:3:retrieval_score", model.info)
    pd.DataFrame([{"layer": 0, "head": 0, "retrieval_score": 1.0}]).to_parquet(tmp_path / "heads.parquet")
    with pytest.raises(AttnprobeError, match="unknown score 'nope'"):
        parse_heads("top:3:nope", model.info, tmp_path)
    assert parse_heads(None, model.info, layers="0-1:every1") == [(l, h) for l in range(2) for h in range(4)]
    drawn = parse_heads("random:3", model.info, seed=1, exclude="0.0,1.0")
    assert len(drawn) == 3 and (0, 0) not in drawn and (1, 0) not in drawn
