"""A census killed midway resumes without redoing finished work and ends with an uninterrupted run's
tables; the three backends give the same heads table."""
import pandas as pd
import pytest

from attnprobe.hooks.backends import BACKENDS, make_backend
from attnprobe.probe import retrieval
from attnprobe.probe.census import Census, CensusConfig

from planted import planted_model

SMALL = dict(sink_sequences=8, prose_sequences=1, prose_length=96, induction_length=20, induction_batch=4,
             perplexity_tokens=96, perplexity_length=48, lengths=[64, 96], depths=[0.0, 1.0], needles=1)
STAGES = ("sinks", "induction", "hidden_sinks", "massive", "secondary_sinks", "retrieval")


def run(out, backend="native", progress=None):
    model = planted_model()
    return Census(model, make_backend(backend, model), CensusConfig(**SMALL), out, progress).execute(STAGES)


def test_interrupted_census_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = run(tmp_path / "whole")

    def stop_after_two(stage, done, total):
        if stage == "retrieval" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", progress=stop_after_two)
    assert len(list((tmp_path / "resumed" / "shards" / "niah").glob("*.json"))) == 2
    decoded = []
    original = retrieval.run_sample
    monkeypatch.setattr(retrieval, "run_sample", lambda *a, **k: decoded.append(1) or original(*a, **k))
    resumed = run(tmp_path / "resumed")
    assert len(decoded) == 2  # only the two samples the killed run had not finished
    pd.testing.assert_frame_equal(whole, resumed)
    for name in ("sinks.parquet", "massive.parquet", "secondary_sinks.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / name), pd.read_parquet(tmp_path / "resumed" / name))
    assert (tmp_path / "whole" / "niah_samples.jsonl").read_text() == (tmp_path / "resumed" / "niah_samples.jsonl").read_text()


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "native"])
def test_heads_table_is_the_same_on_every_backend(tmp_path, backend):
    """Tolerance: 1e-4 absolute on every score (they are attention fractions in [0, 1])."""
    native = run(tmp_path / "native")
    other = run(tmp_path / backend, backend)
    numeric = [c for c in native.columns if pd.api.types.is_float_dtype(native[c])]
    pd.testing.assert_frame_equal(native[numeric], other[numeric], atol=1e-4, rtol=0)
    assert list(native["roles"]) == list(other["roles"])
