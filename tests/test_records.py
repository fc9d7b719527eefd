"""Every results table in README.md and benchmarks/RESULTS.md is rendered from a committed record
(benchmarks/render_tables.py): re-rendering changes nothing, a missing record fails, a changed record changes
the table, and every record path the documents name exists."""
from __future__ import annotations

import difflib
import re
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import render_tables  # noqa: E402


@pytest.mark.parametrize("document", render_tables.DOCUMENTS, ids=lambda path: path.name)
def test_every_table_equals_its_records(document):
    text = document.read_text()
    assert render_tables.MARKER.search(text), f"{document.name} quotes no rendered table"
    fresh = render_tables.render(text)
    difference = "".join(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True), document.name, "rendered"))
    assert not difference, f"run `python benchmarks/render_tables.py`:\n{difference}"


def test_the_readme_quotes_the_headline_tables():
    quoted = set(render_tables.MARKER.findall(str((ROOT / "README.md").read_text())))
    assert {"census", "qwen-masking", "smollm2-conversions", "decode"} <= quoted
    notebook = set(render_tables.MARKER.findall(str((ROOT / "benchmarks" / "RESULTS.md").read_text())))
    assert {"qwen-conversions", "budget-streaming"} <= notebook


def test_a_missing_record_fails_the_render(tmp_path, monkeypatch):
    monkeypatch.setattr(render_tables, "RESULTS", tmp_path)
    with pytest.raises(render_tables.MissingRecord, match="is not committed"):
        render_tables.render((ROOT / "README.md").read_text())


def test_an_unregistered_table_fails_the_render():
    with pytest.raises(KeyError, match="not registered"):
        render_tables.render("<!-- table:nonsense -->\n| a |\n<!-- /table:nonsense -->")


def test_a_changed_record_changes_its_table(tmp_path, monkeypatch):
    sweep = "qwen-h200-2026-12-03/sweep"
    shutil.copytree(render_tables.RESULTS / sweep, tmp_path / sweep)
    path = tmp_path / sweep / "ablation.parquet"
    cells = pd.read_parquet(path)
    top15 = (cells.selection == "top") & (cells.k == 15)
    cells.loc[top15, "accuracy"] = 7 / 32
    cells.to_parquet(path)
    monkeypatch.setattr(render_tables, "RESULTS", tmp_path)
    rendered = render_tables.masking_table(sweep)()
    assert "| top 15 by retrieval score | 7/32 (" in rendered and "4/32" not in rendered


def test_a_count_that_is_not_whole_is_refused():
    with pytest.raises(ValueError, match="not a whole number"):
        render_tables.count_cell(0.3, 8)


@pytest.mark.parametrize("document", render_tables.DOCUMENTS, ids=lambda path: path.name)
def test_every_named_record_is_committed(document):
    named = set(re.findall(r"benchmarks/results/([\w.+-]+(?:/[\w.+-]+)*)", document.read_text()))
    missing = sorted(path for path in named if not (render_tables.RESULTS / path).exists())
    assert not missing, f"{document.name} names records that are not committed: {missing}"


def test_the_census_table_takes_a_column_per_run():
    """Each entry of CENSUS_RUNS is one column."""
    qwen = ("qwen-h200-2026-12-03/census",)
    rendered = render_tables.census_table({"first": qwen, "second": qwen})()
    header, _, *rows = rendered.splitlines()
    assert header == "|  | first | second |" and len(rows) == len(render_tables.CENSUS_ROWS)
    assert all(row.count("|") == 4 for row in rows)  # no cell breaks the table with a stray bar


def test_a_later_massive_run_replaces_the_massive_rows_only():
    own = render_tables.census_column("qwen-h200-2026-12-03/census")
    later = render_tables.census_column("qwen-h200-2026-12-03/census", "qwen-massive-cpu-2026-12-07")
    massive_rows = {i for i, name in enumerate(render_tables.CENSUS_ROWS) if "massive" in name}
    assert len(massive_rows) == 2
    assert all((own[i] == later[i]) == (i not in massive_rows) for i in range(len(own)))
    assert "62 at layer 2, 490 at 3" in later[max(massive_rows)]  # each dim overwritten at its own onset
