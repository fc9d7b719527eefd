"""Ablations on the planted model, where each head's job is known, and ACT calibration by its definition."""
import pandas as pd
import pytest
import torch

from attnprobe.analyses.ablation import ablation_edits, calibrate_sinks, masking_sweep, wilson_interval
from attnprobe.analyses.selection import parse_heads
from attnprobe.hooks.errors import AttnprobeError
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


def test_calibration_scales_hidden_sinks_by_beta_and_renormalises():
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
        expected = original[head] * torch.where(sinks, 0.4, 1.0)
        expected = expected / expected.sum(-1, keepdim=True)
        assert torch.allclose(calibrated[head], expected, atol=1e-6)
    assert torch.equal(calibrated[[0, 3]], original[[0, 3]])


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490, abs=1e-3) and high == pytest.approx(0.943, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0


def test_sweep_top_heads_hurt_more_than_random(planted, tmp_path):
    model, backend = planted
    heads = pd.DataFrame([{"layer": l, "head": h, "retrieval_score": 1.0 if (l, h) == COPY_HEAD else 0.0}
                          for l in range(2) for h in range(4)])
    heads.to_parquet(tmp_path / "heads.parquet")
    summary, rows = masking_sweep(model, backend, tmp_path, ks=[1], seeds=3, task=copy_task)
    top = summary[summary["selection"] == "top"]["accuracy"].item()
    random_acc = summary[summary["selection"] == "random"]["accuracy"]
    assert top == 0.0
    assert summary[summary["selection"] == "none"]["accuracy"].item() == 1.0
    assert len(random_acc) == 3 and set(rows[rows["selection"] == "random"]["variant"]) == {"random-1-s0", "random-1-s1", "random-1-s2"}


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
