"""The census on a model whose answer is known: every planted mechanism is found, and nothing else."""
import json

import pandas as pd
import pytest
import torch

from attnprobe.hooks.backends import base
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.reducers import PatternStats
from attnprobe.hooks.sites import Site
from attnprobe.probe.census import Census, CensusConfig
from attnprobe.probe.retrieval import run_sample

from planted import BOS, COPY_HEAD, MASSIVE_DIM, MASSIVE_VALUE, PREVIOUS_HEAD, SINK_HEAD, planted_model

SMALL = dict(sink_sequences=20, prose_sequences=2, prose_length=128, induction_length=20, perplexity_tokens=128,
             perplexity_length=64)


@pytest.fixture(scope="module")
def census_run(tmp_path_factory):
    model = planted_model()
    out = tmp_path_factory.mktemp("planted")
    heads = Census(model, NativeBackend(model), CensusConfig(**SMALL), out).execute(
        ("sinks", "induction", "hidden_sinks", "massive", "secondary_sinks", "massive_intervention"))
    return heads, out


def heads_with(heads, role):
    return {(r.layer, r.head) for r in heads.itertuples() if role in r.roles.split(",")}


def test_planted_head_roles_are_found_exactly(census_run):
    heads, _ = census_run
    assert heads_with(heads, "previous_token") == {PREVIOUS_HEAD}
    assert heads_with(heads, "induction") == {COPY_HEAD}
    assert heads_with(heads, "sink") == {SINK_HEAD}
    assert heads_with(heads, "duplicate") == set()
    row = heads.set_index(["layer", "head"])
    assert row.loc[PREVIOUS_HEAD, "prev_token_score"] > 0.99
    assert row.loc[COPY_HEAD, "induction_score"] > 0.99
    assert row.loc[SINK_HEAD, "alpha_1"] > 0.99


def test_sink_rate_counts_the_one_sink_head_only_with_bos(census_run):
    _, out = census_run
    rate = json.loads((out / "sink_rate.json").read_text())
    assert rate["with_bos"] == pytest.approx(100 / 8)  # 1 of 2 x 4 heads
    assert rate["without_bos"] == 0.0  # without BOS there is no massive key to attend to


def test_massive_activation_is_the_planted_entry(census_run):
    _, out = census_run
    massive = pd.read_parquet(out / "massive.parquet")
    assert set(massive["dim"]) == {MASSIVE_DIM}
    assert set(massive["position"]) == {0}
    assert set(massive["layer"]) == {0, 1}
    assert massive["value"].abs().min() == pytest.approx(MASSIVE_VALUE, rel=1e-3)
    dims = pd.read_parquet(out / "massive_dims.parquet")
    assert dims[["dim", "first_layer", "sequence_share", "onset_layer", "onset_share"]].values.tolist() == \
        [[MASSIVE_DIM, 0, 1.0, 0, 1.0]]  # every sequence has BOS
    assert massive["sequence"].nunique() == CensusConfig().massive_sequences  # the default scan: 64 sequences
    intervention = pd.read_parquet(out / "massive_intervention.parquet").set_index("intervention")
    assert list(intervention.index) == ["none", "zero", "mean"]
    # values: "none" is the held-out perplexity itself; the planted entry is the same 1000 on every
    # input, so its mean is itself and setting it to the mean changes nothing; zeroing it does
    from attnprobe.probe.perplexity import held_out_perplexity

    model = planted_model()
    config = CensusConfig(**SMALL)
    assert intervention.loc["none", "perplexity"] == pytest.approx(
        held_out_perplexity(NativeBackend(model), config.perplexity_tokens, config.perplexity_length, BOS), rel=1e-6)
    assert intervention.loc["mean", "perplexity"] == pytest.approx(intervention.loc["none", "perplexity"], rel=1e-6)
    assert abs(intervention.loc["zero", "perplexity"] - intervention.loc["none", "perplexity"]) > 1e-3
    assert intervention.loc["zero", "layer"] == 0 and intervention.loc["zero", "dims"] == str(MASSIVE_DIM)


def test_no_hidden_or_secondary_sinks_are_invented(census_run):
    _, out = census_run
    assert pd.read_parquet(out / "sinks.parquet").empty
    secondary = pd.read_parquet(out / "secondary_sinks.parquet")
    assert not (secondary["sink_class"].isin(["primary", "secondary"])).any()


def test_copy_head_is_the_only_retrieval_head():
    model = planted_model()
    g = torch.Generator().manual_seed(1)
    filler = (torch.randperm(30, generator=g) + 2).tolist()
    key, answer = filler[0], filler[1:5]
    haystack = filler[5:]
    prompt = [BOS] + haystack[:12] + [key] + answer + haystack[12:] + [key]
    start = 1 + 12 + 1
    sample = {"prompt_ids": prompt, "answer_span": [start, start + 4], "answer": model.tokenizer.decode(answer)}
    result = run_sample(model, NativeBackend(model), sample, max_new_tokens=4)
    assert result["generated_ids"][:4] == answer
    assert result["accepted"]
    counts = torch.tensor(result["copy_counts"])
    assert counts[COPY_HEAD] == 4
    assert int(counts.sum()) == 4


def test_chunked_statistics_equal_the_eager_pattern(monkeypatch):
    """Statistics computed in query chunks, never holding T x T, equal those from the full eager pattern."""
    model = planted_model()
    ids = torch.cat([torch.tensor([[BOS]]), torch.randint(2, 32, (2, 90), generator=torch.Generator().manual_seed(0))[:1]], 1)
    ids = ids.repeat(2, 1)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 4 * 4 * ids.shape[1] * 7)  # 7 query rows per chunk
    stats = PatternStats(diagonals=(1, 5), track_argmax=True)
    NativeBackend(model).run(ids, reads={(1, Site.PATTERN): stats})
    model.hf.config._attn_implementation = "eager"
    eager = model.hf(ids, output_attentions=True).attentions[1]
    T = ids.shape[1]
    assert torch.allclose(stats.column_sum, eager.sum(dim=2), atol=1e-5)
    assert torch.allclose(stats.alpha(), eager.sum(dim=2) / torch.arange(T, 0, -1), atol=1e-6)
    for off in (1, 5):
        diag = torch.stack([eager[:, :, i, i - off] for i in range(off, T)], dim=-1).mean(-1)
        assert torch.allclose(stats.diagonal(off), diag, atol=1e-6)
    assert torch.equal(stats.argmax_steps[0], eager[:, :, -1].argmax(-1))


def test_sink_rate_thresholds_each_sequence_then_averages():
    """Gu et al.'s code: per sequence, the share of heads with alpha_1 > eps; then the mean over sequences.
    The sink head is a sink only in the rows that start with BOS (alpha_1 ~ 1), not in the others
    (~0.07): its mean alpha (~0.54) passes eps, but it is a sink in half the sequences."""
    from attnprobe.probe.sinks import sink_rate, sink_scan

    model = planted_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 32, (4, 64), generator=g)
    ids[:2, 0] = BOS
    alpha, _ = sink_scan(NativeBackend(model), ids)
    first = alpha[..., 0]
    assert first[:2, SINK_HEAD[0], SINK_HEAD[1]].min() > 0.9 and first[2:, SINK_HEAD[0], SINK_HEAD[1]].max() < 0.3
    assert first[:, SINK_HEAD[0], SINK_HEAD[1]].mean() > 0.3  # thresholding the mean would count it
    assert sink_rate(first, 0.3) == pytest.approx(100 / 8 / 2)


def test_sink_sequences_are_T_long_including_bos(monkeypatch, tmp_path):
    """With BOS the sink-rate sequences are BOS + 63 text tokens (Gu et al. truncate to T with BOS)."""
    from attnprobe.probe import sinks as census_module

    seen = []
    real = census_module.sink_scan

    def spy(backend, ids):
        seen.append((ids.shape[1], bool((ids[:, 0] == BOS).all())))
        return real(backend, ids)

    monkeypatch.setattr(census_module, "sink_scan", spy)
    model = planted_model()
    Census(model, NativeBackend(model), CensusConfig(**SMALL), tmp_path).execute(("sinks",))
    assert sorted(seen) == [(64, False), (64, True)]
    assert json.loads((tmp_path / "sink_rate.json").read_text())["T"] == 64


def test_a_replaced_heads_exact_window_sets_the_sink_rate_length(tmp_path):
    """The sink head replaced by a 16-token window (no sinks kept): at T = 16 it would still be exact softmax
    and a sink by construction; at T = 4 x 16 its first key is seen by a quarter of the queries, so no sink."""
    from attnprobe.hooks.swap import swap_edits
    from attnprobe.probe.sinks import sink_rate, sink_scan

    model = planted_model()
    backend = NativeBackend(model)
    edits = swap_edits(model, "sink+window", layers=[SINK_HEAD[0]], heads=[SINK_HEAD[1]], sinks=0, window=16)
    with backend.standing_edits(edits):
        short = torch.cat([torch.full((4, 1), BOS), torch.randint(2, 32, (4, 15), generator=torch.Generator().manual_seed(0))], 1)
        assert sink_rate(sink_scan(backend, short)[0][..., 0]) == pytest.approx(100 / 8)  # what T = 16 would say
        Census(model, backend, CensusConfig(**{**SMALL, "sink_length": 16}), tmp_path).execute(("sinks",))
    rate = json.loads((tmp_path / "sink_rate.json").read_text())
    assert (rate["T"], rate["T_requested"], rate["exact_window"]) == (64, 16, 16)
    assert rate["with_bos"] == 0.0
    alpha = pd.read_parquet(tmp_path / "shards" / "sinks.parquet").set_index(["layer", "head"])["alpha_1"]
    assert alpha[SINK_HEAD] == pytest.approx(16 / 64, abs=0.02)
