"""The training-token ladder from planted convert runs (matrix.parquet and conversion manifests written by hand, with
known numbers): the table, the recall-vs-tokens figure read back from its Axes, the `ladder` command, its one-line
refusals, and `figures` drawing the ladder into a report; head-level hybrid rows read back from their names and drawn
against their KV-head share (hybrid_budget.py)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
from fixtures_runs import write_synthetic_run
from test_hostile_convert_budget import run_cli
from tiny_hf import CLI

from attnprobe.analyses.conversion.head_hybrid import FAMILIES, SELECTORS, HeadHybrid, kv_count
from attnprobe.analyses.presentation.hybrid_budget import hybrid_budget_curve
from attnprobe.analyses.presentation.ladder import HybridName, hybrid_name, ladder_table, recall_vs_tokens, summary, total_kv_heads
from attnprobe.analyses.presentation.report import write_report
from attnprobe.errors import AttnprobeError

M = 1 << 20
WEIGHTS = "ab" * 32
GDN = "all-gated-deltanet"
RETRIEVAL = {"fraction": 0.25, "stages": "both", "documents": {"passkey": 3}, "seed": 0}
# run name -> (stage-2 tokens, retrieval documents in the data?)
RUNGS = {"r2M": (2 * M, False), "r20M": (20 * M, False), "r2M-retrieval": (2 * M, True), "r20M-retrieval": (20 * M, True)}
PASSKEY = {"original": 0.95, "control": 0.875,
           (GDN, 2 * M, False): 0.125, (GDN, 20 * M, False): 0.25, (GDN, 2 * M, True): 0.5, (GDN, 20 * M, True): 0.75}
TASK_SCALE = {"passkey": 1.0, "kv_recall": 0.5, "copy": 0.25, "niah": 1.0}  # powers of two: every product is exact
PERPLEXITY = {"original": 10.0, "control": 12.0, GDN: 18.0}
TRANSFER = {"control": 0, GDN: 1 * M}


def passkey_of(architecture: str, tokens: int, retrieval: bool) -> float:
    return PASSKEY.get(architecture) or PASSKEY[(architecture, tokens, retrieval)]


def samples(task: str, tokens: int) -> int:
    return 50 if task == "niah" and tokens == 2 * M else 100  # NIAH evaluated smaller at the 2M rung


def matrix_row(architecture: str, tokens: int, retrieval: bool) -> dict:
    row = {"architecture": architecture, "description": "planted", "softmax_heads": 9, "state_bytes_per_token": 64.0}
    for task, scale in TASK_SCALE.items():
        accuracy = passkey_of(architecture, tokens, retrieval) * scale
        row.update({f"{task}_acc": accuracy, f"{task}_ci_low": accuracy / 2, f"{task}_ci_high": (1 + accuracy) / 2,
                    f"{task}_n": samples(task, tokens)})
    row.update(perplexity=PERPLEXITY[architecture], ppl_vs_original=PERPLEXITY[architecture] / 10.0,
               ppl_vs_control=PERPLEXITY[architecture] / PERPLEXITY["control"],
               gate="reference" if architecture in ("original", "control") else "pass")
    if architecture != "original":
        row.update(stage2_tokens=tokens, conversion=f"/elsewhere/conversions/{architecture}")
    return row


def conversion_manifest(architecture: str, tokens: int, retrieval: bool, weights: str = WEIGHTS) -> dict:
    data = {"sha256": "d" * 64, "length": 2048, "windows": 64, **({"retrieval": RETRIEVAL} if retrieval else {})}
    return {"identity": {}, "model_id": "tiny-planted", "model_hash": weights, "kernel": None if architecture == "control" else "gdn",
            "train": "lora", "heads": {}, "config": {"ce_weight": 0.1, "length": 2048, "batch": 32, "tokens": tokens},
            "data": data, "budget": {"transfer_tokens": TRANSFER[architecture], "tokens": tokens, "steps": tokens // 65536,
                                     "transfer_steps": 16}}


def plant_run(directory: Path, tokens: int, retrieval: bool, weights: str = WEIGHTS, manifest: bool = True) -> Path:
    """A convert run as `attnprobe convert` leaves it: matrix.parquet, manifest.json, conversions/NAME/conversion.json."""
    directory.mkdir(parents=True)
    rows = [matrix_row(name, tokens, retrieval) for name in ("original", "control", GDN)]
    pd.DataFrame(rows).to_parquet(directory / "matrix.parquet", index=False)
    for name in ("control", GDN):
        (directory / "conversions" / name).mkdir(parents=True)
        (directory / "conversions" / name / "conversion.json").write_text(json.dumps(conversion_manifest(name, tokens, retrieval, weights)))
    if manifest:
        (directory / "manifest.json").write_text(json.dumps({"model_id": "tiny-planted", "weights_sha256": weights,
                                                             "command": "convert"}))
    return directory


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [plant_run(tmp_path / name, tokens, retrieval) for name, (tokens, retrieval) in RUNGS.items()]




def one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- the table ----------------------------------------------------------------------------------------------

def test_the_table_holds_every_run_and_row_with_what_it_trained_on(runs):
    table = ladder_table(runs)
    accuracy = [f"{task}{suffix}" for task in TASK_SCALE for suffix in ("_acc", "_ci_low", "_ci_high", "_n")]
    assert list(table.columns) == ["run", "architecture", "family", "selector", "draw", "kv_share", "stage2_tokens",
                                   "transfer_tokens", "retrieval_fraction", "retrieval_stages", "ce_weight", *accuracy,
                                   "perplexity", "ppl_vs_control", "gate"]
    assert len(table) == 12
    for row in table.itertuples():
        tokens, retrieval = RUNGS[Path(row.run).name]
        trained = row.architecture != "original"
        assert row.stage2_tokens == (tokens if trained else 0)
        assert row.transfer_tokens == TRANSFER.get(row.architecture, 0)
        assert row.retrieval_fraction == (0.25 if retrieval and trained else 0.0)
        assert row.retrieval_stages == "both" if retrieval and trained else pd.isna(row.retrieval_stages)
        assert row.ce_weight == 0.1 if trained else math.isnan(row.ce_weight)
        assert pd.isna(row.family) and pd.isna(row.selector) and pd.isna(row.draw) and math.isnan(row.kv_share)  # no hybrid
        expected = matrix_row(row.architecture, tokens, retrieval)
        for column in [*accuracy, "perplexity", "ppl_vs_control", "gate"]:
            assert getattr(row, column) == expected[column], (row.run, row.architecture, column)
    assert table["stage2_tokens"].dtype == "int64" and table["transfer_tokens"].dtype == "int64"


def test_the_printed_summary_names_budgets_and_retrieval(runs):
    shown = summary(ladder_table(runs))
    gdn = shown[(shown["architecture"] == GDN) & (shown["run"] == "r20M-retrieval")].iloc[0]
    assert (gdn["stage2"], gdn["retrieval"], gdn["passkey"], gdn["ppl/control"], gdn["gate"]) == ("20M", "25%", "75%", "1.500", "pass")
    assert shown[shown["architecture"] == "original"]["stage2"].eq("0").all()


def test_a_row_finished_from_a_checkpoint_has_unknown_retrieval(runs):
    path = runs[0] / "conversions" / GDN / "conversion.json"
    manifest = json.loads(path.read_text())
    manifest.update(data={"sha256": "d" * 64}, partial={"step": 3, "steps": 32, "checkpoint": "c.safetensors"})
    path.write_text(json.dumps(manifest))
    table = ladder_table(runs[:1])
    assert math.isnan(table.set_index("architecture").at[GDN, "retrieval_fraction"])
    assert table.set_index("architecture").at["control", "retrieval_fraction"] == 0.0


def test_runs_evaluated_by_parts_are_compared_by_their_conversions_weights(tmp_path):
    first = plant_run(tmp_path / "a", 2 * M, False, manifest=False)
    other = plant_run(tmp_path / "b", 20 * M, False, weights="cd" * 32, manifest=False)
    assert len(ladder_table([first, plant_run(tmp_path / "c", 20 * M, True, manifest=False)])) == 6
    with pytest.raises(AttnprobeError, match="runs of different models \\(weights abababababab and cdcdcdcdcdcd\\)"):
        ladder_table([first, other])


# ---- the figure ---------------------------------------------------------------------------------------------

def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.lines}


def test_the_figure_has_a_panel_per_task_and_one_of_perplexity(runs):
    fig = recall_vs_tokens(ladder_table(runs))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["passkey (n = 100)", "KV recall (n = 100)", "copy (n = 100)", "NIAH (n = 50–100)",
                      "perplexity relative to the control"]
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert [tick.get_text() for tick in ax.get_xticklabels()] == ["2M", "20M"]


def test_each_architecture_is_a_line_solid_with_retrieval_dashed_without(runs):
    fig = recall_vs_tokens(ladder_table(runs))
    retrieval = f"{GDN}, retrieval 25% (both stages)"
    for ax, (task, scale) in zip(fig.axes, TASK_SCALE.items()):
        lines = lines_by_label(ax)
        assert set(lines) == {"original", "control", "control, retrieval 25% (both stages)", GDN, retrieval}, task
        assert list(lines[GDN].get_xdata()) == [2 * M, 20 * M]
        assert list(lines[GDN].get_ydata()) == [0.125 * scale, 0.25 * scale]
        assert list(lines[retrieval].get_ydata()) == [0.5 * scale, 0.75 * scale]
        assert list(lines["control"].get_ydata()) == [0.875 * scale] * 2
        assert lines[GDN].get_linestyle() == "--" and lines[retrieval].get_linestyle() == "-"
        assert lines[GDN].get_color() == lines[retrieval].get_color() != lines["control"].get_color()
        assert list(lines["original"].get_ydata()) == [0.95 * scale] * 2  # a horizontal reference line
        assert len(ax.collections) >= 4  # each line's 95 % bars (and the original's band)
    perplexity = lines_by_label(fig.axes[-1])
    assert "original" not in perplexity
    assert list(perplexity[retrieval].get_ydata()) == [1.5, 1.5] and list(perplexity["control"].get_ydata()) == [1.0, 1.0]


def test_a_ladder_without_recall_is_refused():
    with pytest.raises(AttnprobeError, match="ladder.parquet"):
        recall_vs_tokens(pd.DataFrame({"run": ["r"], "architecture": ["original"]}))


# ---- the command --------------------------------------------------------------------------------------------

def test_the_command_writes_the_ladder_and_prints_it(runs, tmp_path, monkeypatch, capsys):
    result = run_cli(monkeypatch, capsys, "ladder", *runs, "--out", tmp_path / "ladder")
    assert result.returncode == 0, result.stderr
    written = pd.read_parquet(tmp_path / "ladder" / "ladder.parquet")
    pd.testing.assert_frame_equal(written, ladder_table(runs))
    printed = " ".join(result.stdout.split())
    assert "r20M-retrieval all-gated-deltanet 20M 25% 75%" in printed
    assert str(tmp_path / "ladder" / "ladder.parquet") in "".join(printed.split())  # rich wraps long paths


def damage(runs: list[Path], tmp_path: Path, how: str) -> list:
    """The ladder's arguments with one thing wrong."""
    if how == "no matrix":
        (runs[1] / "matrix.parquet").unlink()
    elif how == "damaged matrix":
        (runs[1] / "matrix.parquet").write_bytes(b"PAR1 truncated")
    elif how == "damaged conversion":
        (runs[1] / "conversions" / GDN / "conversion.json").write_text('{"budget": ')
    elif how == "no conversion":
        (runs[1] / "conversions" / GDN / "conversion.json").unlink()
    elif how == "other model":
        runs.append(plant_run(tmp_path / "other", 20 * M, False, weights="ef" * 32))
    elif how == "missing directory":
        runs.append(tmp_path / "nowhere")
    elif how == "named twice":
        runs.append(runs[0])
    elif how == "no runs":
        runs.clear()
    return [*runs, "--out", runs[0] if how == "out is a run" else tmp_path / "ladder"]


@pytest.mark.parametrize("how, message", [
    ("no runs", "name the convert runs of the ladder"),
    ("missing directory", "nowhere not found"),
    ("out is a run", "is one of the runs"),
    ("no matrix", "r20M/matrix.parquet not found: run `attnprobe convert --part evaluate"),
    ("damaged matrix", "r20M/matrix.parquet is unreadable"),
    ("no conversion", f"r20M/conversions/{GDN}/conversion.json not found"),
    ("damaged conversion", f"r20M/conversions/{GDN}/conversion.json is damaged"),
    ("other model", "are runs of different models"),
    ("named twice", "r2M is named twice"),
])
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, monkeypatch, capsys, how, message):
    result = run_cli(monkeypatch, capsys, "ladder", *damage(runs, tmp_path, how))
    one_line(result, message)
    assert not (tmp_path / "ladder").exists()


def test_the_help_imports_no_torch():
    result = subprocess.run([CLI[0], "-X", "importtime", *CLI[1:], "ladder", "--help"], capture_output=True, text=True, timeout=120)
    modules = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert result.returncode == 0 and "--out" in result.stdout
    assert not modules & {"torch", "pandas", "matplotlib"}


# ---- figures and the report ---------------------------------------------------------------------------------

def test_figures_draws_the_ladder_into_the_report(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ladder"
    assert run_cli(monkeypatch, capsys, "ladder", *runs, "--out", out).returncode == 0
    result = run_cli(monkeypatch, capsys, "figures", out, "--format", "png")
    assert result.returncode == 0, result.stderr
    assert (out / "figures" / "recall_vs_tokens.png").is_file()
    page = (out / "report.html").read_text()
    assert "<figure id='recall_vs_tokens'>" in page and "Training-token ladder (ladder.parquet)" in page
    assert "hybrid_budget_curve" not in page  # no head-level hybrid rows: not drawn, not mentioned


def test_other_runs_do_not_mention_the_ladder_figure_and_a_damaged_ladder_is_named(runs, tmp_path):
    census = write_synthetic_run(tmp_path / "census")
    page = write_report(census, formats=("png",)).read_text()
    assert "recall_vs_tokens" not in page and "Skipped" not in page
    ladder_table(runs).to_parquet(census / "ladder.parquet")
    assert "<figure id='recall_vs_tokens'>" in write_report(census, formats=("png",)).read_text()
    (census / "ladder.parquet").write_bytes(b"damaged")
    page = write_report(census, formats=("png",)).read_text()
    assert "Skipped <b>recall_vs_tokens</b>: ladder.parquet unreadable" in page
    assert not (census / "figures" / "recall_vs_tokens.png").exists()  # no stale figure beside the report


# ---- head-level hybrids against their KV-head budget (issue 43) --------------------------------------------------

TOTAL_KV = 64
# (selector, share) -> passkey accuracy; random: one per draw. Powers of two: every product is exact.
HYBRID_PASSKEY = {("retrieval", "6.25%"): 0.5, ("retrieval", "12.5%"): 0.75,
                  ("duo", "6.25%"): 0.25, ("duo", "12.5%"): 0.5,
                  ("random", "6.25%"): (0.0625, 0.125, 0.25), ("random", "12.5%"): (0.125, 0.25, 0.375)}
HYBRID_PERPLEXITY = {"6.25%": 15.0, "12.5%": 13.5}  # the control's is 12


def hybrid_row(hybrid: HeadHybrid, tokens: int, passkey: float, perplexity: float, total: int | None = TOTAL_KV) -> dict:
    """A hybrid's matrix row as convert writes it (`description` from head_hybrid.variant)."""
    row = matrix_row("control", tokens, False)
    count = kv_count(hybrid.kv_budget, total or TOTAL_KV)
    row.update(architecture=hybrid.name, gate="pass", conversion=f"/elsewhere/conversions/{hybrid.name}",
               description=f"{count} of {total} KV heads softmax by {hybrid.selector}, the rest {hybrid.family}" if total
               else "planted", perplexity=perplexity, ppl_vs_original=perplexity / 10.0,
               ppl_vs_control=perplexity / PERPLEXITY["control"])
    for task, scale in TASK_SCALE.items():
        row.update({f"{task}_acc": passkey * scale, f"{task}_ci_low": passkey * scale / 2,
                    f"{task}_ci_high": (1 + passkey * scale) / 2})
    return row


def hybrids(family: str = "gated-deltanet", draws: int = 3, budgets=("6.25%", "12.5%")) -> list[tuple[HeadHybrid, float, float]]:
    """(hybrid, passkey, perplexity) for two selectors and `draws` random draws at each budget."""
    planted = []
    for budget in budgets:
        for selector in ("retrieval", "duo"):
            planted.append((HeadHybrid(selector, budget, family), HYBRID_PASSKEY[(selector, budget)], HYBRID_PERPLEXITY[budget]))
        for draw in range(draws):
            planted.append((HeadHybrid("random", budget, family, draw), HYBRID_PASSKEY[("random", budget)][draw],
                            HYBRID_PERPLEXITY[budget] + draw * 0.75))
    return planted


def plant_hybrid_run(directory: Path, tokens: int, planted: list, total: int | None = TOTAL_KV) -> Path:
    """A convert run with hybrid rows beside the original and the control (manifests as for the GDN row)."""
    plant_run(directory, tokens, False)
    matrix = pd.read_parquet(directory / "matrix.parquet")
    rows = [hybrid_row(hybrid, tokens, passkey, perplexity, total) for hybrid, passkey, perplexity in planted]
    pd.concat([matrix[matrix["architecture"] != GDN], pd.DataFrame(rows)], ignore_index=True).to_parquet(
        directory / "matrix.parquet", index=False)
    for hybrid, _, _ in planted:
        (directory / "conversions" / hybrid.name).mkdir(parents=True)
        (directory / "conversions" / hybrid.name / "conversion.json").write_text(
            json.dumps(conversion_manifest(GDN, tokens, False)))
    return directory


@pytest.fixture
def hybrid_runs(tmp_path) -> list[Path]:
    """20M: two selectors x two budgets and three random draws; 2M: the retrieval selector at 12.5 % only."""
    return [plant_hybrid_run(tmp_path / "h20M", 20 * M, hybrids()),
            plant_hybrid_run(tmp_path / "h2M", 2 * M, [(HeadHybrid("retrieval", "12.5%"), 0.25, 16.5)])]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("selector", SELECTORS)
def test_every_family_and_selector_is_read_back_from_the_row_name(family, selector):
    for budget, share in (("12.5%", 0.125), ("6.25%", 0.0625), ("2%", 0.02), ("0.125", 0.125), ("11", 11 / 90)):
        hybrid = HeadHybrid(selector, budget, family, draw=2)
        parsed = hybrid_name(hybrid.name)
        assert parsed is not None, hybrid.name
        assert (parsed.family, parsed.selector, parsed.budget) == (family, selector, budget)
        assert parsed.draw == (2 if selector == "random" else None)
        assert parsed.kv_share(90) == pytest.approx(share)
        assert parsed.is_count == (budget == "11")


def test_the_documented_names_and_counts():
    assert hybrid_name("hybrid-gated-deltanet-retrieval-12.5pct") == HybridName("gated-deltanet", "retrieval", None, "12.5%")
    assert hybrid_name("hybrid-gated-deltanet-random-draw1-12.5pct") == HybridName("gated-deltanet", "random", 1, "12.5%")
    assert hybrid_name("hybrid-kda-duo-6.25pct").kv_share() == 0.0625
    assert hybrid_name("hybrid-sink+window+gdn-teacher-forced-11").kv_share(88) == 0.125
    assert math.isnan(hybrid_name("hybrid-kda-kl-layers-11").kv_share())  # a count of an unknown total
    assert total_kv_heads("11 of 90 KV heads softmax by retrieval, the rest gated-deltanet") == 90
    assert total_kv_heads("planted") is None and total_kv_heads(None) is None


@pytest.mark.parametrize("name", ["original", "control", GDN, "all-kda", "hybrid-mamba-retrieval-12.5pct",
                                  "hybrid-kda-oracle-12.5pct", "hybrid-kda-random-12.5pct", "hybrid-kda-duo-draw1-12.5pct",
                                  "hybrid-kda-duo", "hybrid-kda-duo-12.5%", "hybrid-kda-duo-12.5pct-extra"])
def test_other_names_are_no_hybrid(name):
    assert hybrid_name(name) is None


def test_the_table_places_hybrid_rows_by_family_selector_draw_and_share(hybrid_runs, tmp_path):
    counted = plant_hybrid_run(tmp_path / "counted", 20 * M, [(HeadHybrid("retrieval", "8", "kda"), 0.5, 14.0)])
    unknown = plant_hybrid_run(tmp_path / "unknown", 20 * M, [(HeadHybrid("duo", "8", "kda"), 0.5, 14.0)], total=None)
    table = ladder_table([*hybrid_runs, counted, unknown]).set_index(["run", "architecture"])
    assert list(table.columns[:4]) == ["family", "selector", "draw", "kv_share"]
    draw = table.loc[(str(hybrid_runs[0]), "hybrid-gated-deltanet-random-draw2-6.25pct")]
    assert (draw["family"], draw["selector"], draw["draw"], draw["kv_share"]) == ("gated-deltanet", "random", 2, 0.0625)
    chosen = table.loc[(str(hybrid_runs[0]), "hybrid-gated-deltanet-duo-12.5pct")]
    assert (chosen["selector"], chosen["kv_share"]) == ("duo", 0.125) and pd.isna(chosen["draw"])
    assert table.loc[(str(counted), "hybrid-kda-retrieval-8"), "kv_share"] == 8 / TOTAL_KV  # from the description
    assert math.isnan(table.loc[(str(unknown), "hybrid-kda-duo-8"), "kv_share"])
    others = table[table.index.get_level_values("architecture").isin(["original", "control"])]
    assert others["family"].isna().all() and others["draw"].isna().all() and others["kv_share"].isna().all()
    assert table["draw"].dtype == "Int64" and len(table) == 3 * 4 + 3 + 3 + 3


def bands(ax) -> dict:
    """label -> {x: (lowest, highest)} of each fill_between band, read from its polygon."""
    found = {}
    for collection in ax.collections:
        if str(collection.get_gid()).startswith("band: "):
            spans = {}
            for x, y in collection.get_paths()[0].vertices:
                low, high = spans.get(round(x, 6), (y, y))
                spans[round(x, 6)] = (min(low, y), max(high, y))
            found[collection.get_gid().removeprefix("band: ")] = spans
    return found


def named_lines(ax) -> dict:
    return {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}


def test_the_budget_figure_draws_a_line_per_selector_and_random_as_a_band(hybrid_runs):
    fig = hybrid_budget_curve(ladder_table(hybrid_runs))
    assert [ax.get_title() for ax in fig.axes] == ["passkey (n = 100)", "KV recall (n = 100)", "copy (n = 100)",
                                                   "NIAH (n = 100)", "perplexity relative to the control"]
    assert "20M stage-2 tokens" in fig._suptitle.get_text() and "n = 100 per point" in fig._suptitle.get_text()
    assert "the rest gated-deltanet" in fig._suptitle.get_text()
    for ax, (task, scale) in zip(fig.axes, TASK_SCALE.items()):
        assert ax.get_xscale() == "linear"
        assert [tick.get_text() for tick in ax.get_xticklabels()] == ["6.25%", "12.5%"]
        lines = named_lines(ax)
        assert set(lines) == {"retrieval", "duo", "random (3 draws)", "original", "control"}, task
        assert list(lines["retrieval"].get_xdata()) == [0.0625, 0.125]
        assert list(lines["retrieval"].get_ydata()) == [0.5 * scale, 0.75 * scale]
        assert list(lines["duo"].get_ydata()) == [0.25 * scale, 0.5 * scale]
        assert list(lines["random (3 draws)"].get_ydata()) == pytest.approx([0.4375 / 3 * scale, 0.25 * scale])
        assert lines["retrieval"].get_color() != lines["duo"].get_color() != lines["random (3 draws)"].get_color()
        assert list(lines["original"].get_ydata()) == [0.95 * scale] * 2 and list(lines["control"].get_ydata()) == [0.875 * scale] * 2
        spans = bands(ax)["random (3 draws)"]
        assert spans == {0.0625: (0.0625 * scale, 0.25 * scale), 0.125: (0.125 * scale, 0.375 * scale)}
    perplexity = named_lines(fig.axes[-1])
    assert list(perplexity["retrieval"].get_ydata()) == [15.0 / 12, 13.5 / 12]
    assert list(perplexity["random (3 draws)"].get_ydata()) == pytest.approx([15.75 / 12, 14.25 / 12])
    assert list(perplexity["control"].get_ydata()) == [1.0, 1.0] and "original" in perplexity
    assert bands(fig.axes[-1])["random (3 draws)"] == {0.0625: (1.25, 1.375), 0.125: (1.125, 1.25)}


def test_the_budget_figure_picks_a_stage2_budget(hybrid_runs):
    table = ladder_table(hybrid_runs)
    fig = hybrid_budget_curve(table, tokens=2 * M)
    lines = named_lines(fig.axes[0])
    assert set(lines) == {"retrieval", "original", "control"}
    assert list(lines["retrieval"].get_ydata()) == [0.25] and list(lines["control"].get_ydata()) == [0.875] * 2
    assert [tick.get_text() for tick in fig.axes[0].get_xticklabels()] == ["12.5%"]
    assert "2M stage-2 tokens" in fig._suptitle.get_text()
    with pytest.raises(AttnprobeError, match="no hybrid row of ladder.parquet trained 200M stage-2 tokens: choose 2M, 20M"):
        hybrid_budget_curve(table, tokens=200 * M)


def test_a_lone_random_draw_is_points_and_families_differ_by_line_style(tmp_path):
    planted = hybrids(draws=1) + hybrids("kda", draws=1, budgets=("12.5%",))
    fig = hybrid_budget_curve(ladder_table([plant_hybrid_run(tmp_path / "run", 20 * M, planted)]))
    lines = named_lines(fig.axes[0])
    assert {"retrieval, gated-deltanet", "retrieval, kda", "random (draw 0), gated-deltanet"} <= set(lines)
    assert lines["random (draw 0), gated-deltanet"].get_linestyle() == "None"
    assert list(lines["random (draw 0), gated-deltanet"].get_ydata()) == [0.0625, 0.125]
    assert not bands(fig.axes[0])
    assert lines["retrieval, gated-deltanet"].get_linestyle() == "-" and lines["retrieval, kda"].get_linestyle() == "--"
    assert lines["retrieval, gated-deltanet"].get_color() == lines["retrieval, kda"].get_color()
    assert "line style: the rest's family" in fig._suptitle.get_text()


def test_a_ladder_without_hybrids_is_refused_by_the_figure(runs):
    with pytest.raises(AttnprobeError, match="ladder.parquet holds no head-level hybrid rows"):
        hybrid_budget_curve(ladder_table(runs))


def test_the_report_draws_the_budget_figure_only_where_the_ladder_holds_hybrids(hybrid_runs, runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hybrid-ladder"
    assert run_cli(monkeypatch, capsys, "ladder", *hybrid_runs, "--out", out).returncode == 0
    result = run_cli(monkeypatch, capsys, "figures", out, "--format", "png")
    assert result.returncode == 0, result.stderr
    assert (out / "figures" / "hybrid_budget_curve.png").is_file()
    assert "<figure id='hybrid_budget_curve'>" in (out / "report.html").read_text()
    ladder_table(runs).to_parquet(out / "ladder.parquet")  # the same directory, now without hybrids
    page = write_report(out, formats=("png",)).read_text()
    assert "hybrid_budget_curve" not in page and "<figure id='recall_vs_tokens'>" in page  # not drawn, not named
    assert not (out / "figures" / "hybrid_budget_curve.png").exists()  # no stale figure beside the report
    older = ladder_table(hybrid_runs).drop(columns=["family", "selector", "draw", "kv_share"])
    older.to_parquet(out / "ladder.parquet")  # written before the hybrid columns: named, in one sentence
    page = write_report(out, formats=("png",)).read_text()
    assert "Skipped <b>hybrid_budget_curve</b>: ladder.parquet lacks columns family, selector, draw, kv_share" in page
