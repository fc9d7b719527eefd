"""The training-token ladder from planted convert runs (matrix.parquet and conversion manifests written by hand, with
known numbers): the table, the recall-vs-tokens figure read back from its Axes, the `ladder` command, its one-line
refusals, and `figures` drawing the ladder into a report."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
from fixtures_runs import write_synthetic_run
from tiny_hf import CLI

from attnprobe.analyses.presentation.ladder import ladder_table, recall_vs_tokens, summary
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


def run_cli(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """main() in this process, as the console script runs it."""
    from attnprobe.analyses import cli

    monkeypatch.setattr(sys, "argv", ["attnprobe", *map(str, args)])
    with pytest.raises(SystemExit) as code:
        cli.main()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code.value.code, captured.out, captured.err)


def one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---- the table ----------------------------------------------------------------------------------------------

def test_the_table_holds_every_run_and_row_with_what_it_trained_on(runs):
    table = ladder_table(runs)
    accuracy = [f"{task}{suffix}" for task in TASK_SCALE for suffix in ("_acc", "_ci_low", "_ci_high", "_n")]
    assert list(table.columns) == ["run", "architecture", "stage2_tokens", "transfer_tokens", "retrieval_fraction",
                                   "retrieval_stages", "ce_weight", *accuracy, "perplexity", "ppl_vs_control", "gate"]
    assert len(table) == 12
    for row in table.itertuples():
        tokens, retrieval = RUNGS[Path(row.run).name]
        trained = row.architecture != "original"
        assert row.stage2_tokens == (tokens if trained else 0)
        assert row.transfer_tokens == TRANSFER.get(row.architecture, 0)
        assert row.retrieval_fraction == (0.25 if retrieval and trained else 0.0)
        assert row.retrieval_stages == "both" if retrieval and trained else pd.isna(row.retrieval_stages)
        assert row.ce_weight == 0.1 if trained else math.isnan(row.ce_weight)
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
