"""The mechanism registry: declarations are consistent, and a new probe module alone reaches the census,
the heads table, the roles, the CLI summary and options, the matrix columns and the figures."""
import importlib
import textwrap

import pandas as pd
import pytest

import attnprobe.probe as probe_package
from attnprobe.probe import mechanisms
from attnprobe.probe.census import Census, CensusConfig

from planted import planted_model

TOY = '''
"""A toy mechanism: heads that attend to their own position (the diagonal)."""
from attnprobe.probe.mechanisms import Mechanism, Stage
from attnprobe.probe.patterns import diagonal_by_layer, pattern_stats
from attnprobe.probe.rundir import write_parquet


def stage(census):
    ids = census.natural(4, 32, census.bos)
    score = diagonal_by_layer(pattern_stats(census.backend, ids, diagonals=(0,)), 0)
    write_parquet(census.run.shard("self.parquet"), census.per_head({"self_score": score}))


CENSUS = (
    Stage("self_attention", stage, order=25, shard="self.parquet", columns=("self_score",)),
    Mechanism("self_attending", "self_attention", "self-attending heads", column="self_score", threshold=0.05,
              letter="A", rank=35, panel="self", matrix="self", matrix_label="self heads"),
)
'''


def _reload_registry_readers():
    mechanisms.stages.cache_clear()
    mechanisms.mechanisms.cache_clear()
    from attnprobe.analyses import cli
    from attnprobe.analyses.presentation import figures
    from attnprobe.analyses.presentation import style
    for module in (style, figures, cli):
        importlib.reload(module)


@pytest.fixture
def toy_module(tmp_path, monkeypatch):
    """probe/toy_self.py, as a contributor would add it: a new file in the probe package, nothing else."""
    (tmp_path / "toy_self.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(probe_package, "__path__", [*probe_package.__path__, str(tmp_path)])
    _reload_registry_readers()
    yield
    monkeypatch.undo()
    _reload_registry_readers()


def test_declarations_are_consistent():
    stages = {s.name: s for s in mechanisms.stages()}
    for mechanism in mechanisms.mechanisms():
        if mechanism.is_role:  # the column that decides a role is one its stage declares
            assert mechanism.column in stages[mechanism.stage].columns, mechanism.name
            assert mechanism.letter
        if mechanism.panel:
            assert (mechanism.panel_column or mechanism.column) in stages[mechanism.stage].columns
    assert set(CensusConfig().thresholds) == {m.name for m in mechanisms.mechanisms() if m.threshold is not None}
    letters = [m.letter for m in mechanisms.roles()]
    assert len(letters) == len(set(letters))


def test_roles_follow_the_runs_own_thresholds():
    heads = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "retrieval_score": [0.15, 0.05], "alpha_1": [0.5, 0.2]})
    row = heads.iloc[0]
    assert mechanisms.head_roles(row, CensusConfig().thresholds) == ["retrieval", "sink"]
    strict = CensusConfig(thresholds={"retrieval": 0.2, "sink": 0.6}).thresholds
    assert mechanisms.head_roles(row, strict) == []
    with pytest.raises(Exception, match="unknown role threshold"):
        CensusConfig(thresholds={"nonsense": 0.1})


def test_a_new_probe_module_alone_reaches_every_reader(toy_module, tmp_path):
    from attnprobe.analyses import cli
    from attnprobe.analyses.presentation import figures
    from attnprobe.analyses.presentation import style
    from attnprobe.hooks.backends.native import NativeBackend

    assert "self_attention" in [s.name for s in mechanisms.stages()]
    model = planted_model()
    out = tmp_path / "run"
    heads = Census(model, NativeBackend(model), CensusConfig(sink_sequences=8), out).execute(("sinks", "self_attention"))
    assert "self_score" in heads.columns
    holders = {(r.layer, r.head) for r in heads.itertuples() if "self_attending" in r.roles.split(",")}
    assert holders == {(r.layer, r.head) for r in heads.itertuples() if r.self_score > 0.05}
    assert 0 < len(holders) < len(heads)
    # the CLI: its option and its summary line
    import inspect
    assert "self_attending_threshold" in inspect.signature(cli.census).parameters
    printed = []
    cli.console.print = lambda text, **kw: printed.append(text)
    cli.print_summary(out, heads)
    assert any("self-attending heads" in line and f"{len(holders)} of 8 above 0.05" in line for line in printed)
    # the matrix's census columns and the figures' style
    columns = {k: v for m in mechanisms.mechanisms() if m.matrix == "self" for k, v in m.matrix_columns(out, heads, CensusConfig().thresholds).items()}
    assert columns == {"self_heads": len(holders), "self_present": True}
    assert "self_present" in figures._MATRIX_COLUMNS
    assert ("self_score", "self") in figures.SCORE_PANELS
    assert style.ROLE_ABBREVIATIONS["self_attending"] == "A"
    fig = figures.role_map(heads)
    assert any("A  self attending" == text.get_text() for text in fig.legends[0].get_texts())


def test_cli_summary_uses_the_runs_own_thresholds(tmp_path, monkeypatch):
    from attnprobe.analyses import cli
    from attnprobe.probe.rundir import write_json

    heads = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "induction_score": [0.95, 0.6, 0.2]})
    write_json(tmp_path / "manifest.json", {"config": {"thresholds": {"induction": 0.9}}})
    printed = []
    monkeypatch.setattr(cli.console, "print", lambda text, **kw: printed.append(text))
    cli.print_summary(tmp_path, heads)
    assert any("induction heads" in line and "1 of 3 above 0.9: 0.0=0.95" in line for line in printed), printed
