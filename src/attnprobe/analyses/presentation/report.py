"""From a run directory to figures (RUN_DIR/figures/) and one self-contained report.html.

    paths = make_figures(run_dir, formats=("png", "svg", "pdf"))
    report = write_report(run_dir)       # draws the figures too; PNGs inlined as data URIs

Every table is optional: a figure whose table is missing, empty or malformed is skipped, and the
report says why (a figure of OPTIONAL_FIGURES, such as the ladder's, only where its file is there). Nothing
here runs a model.
"""
from __future__ import annotations

import base64
import html
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
from matplotlib.figure import Figure

from attnprobe.errors import AttnprobeError
from attnprobe.io import atomic_write_text

from attnprobe.analyses.presentation import figures, hybrid_budget, ladder

from attnprobe.analyses.presentation import style
TABLE_FILES = {
    "heads": "heads.parquet", "massive_layers": "massive_layers.parquet", "massive": "massive.parquet",
    "sinks": "sinks.parquet", "secondary_sinks": "secondary_sinks.parquet", "niah": "niah.parquet",
    "ablation": "ablation.parquet", "matrix": "matrix.parquet", "recall": "recall.parquet",
    "budget": "budget.parquet", "ladder": "ladder.parquet",
}
JSON_FILES = {"manifest": "manifest.json", "sink_rate": "sink_rate.json"}
TABLE_ROW_LIMIT = 60  # long event tables are cut in the report; the parquet files hold everything


@dataclass
class Run:
    directory: Path
    manifest: dict | None = None
    sink_rate: dict | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # file -> why it is not in `tables`


def load_run(run_dir: Path | str) -> Run:
    """Read every known file of a run directory; unreadable or absent files are noted, not fatal."""
    directory = Path(run_dir)
    if not directory.is_dir():
        raise AttnprobeError(f"run directory {directory} not found: pass the folder a census wrote")
    run = Run(directory)
    for name, filename in JSON_FILES.items():
        path = directory / filename
        if not path.is_file():
            run.problems[filename] = "not in the run directory"
            continue
        try:
            setattr(run, name, json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            run.problems[filename] = f"unreadable ({type(exc).__name__})"
    for name, filename in TABLE_FILES.items():
        path = directory / filename
        if not path.is_file():
            run.problems[filename] = "not in the run directory"
            continue
        try:
            run.tables[name] = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several kinds of errors on a damaged file
            run.problems[filename] = f"unreadable ({type(exc).__name__})"
    if not run.tables and run.manifest is None:
        raise AttnprobeError(f"{directory} holds no run files (manifest.json, heads.parquet, ...): pass a census run directory")
    return run


@dataclass(frozen=True)
class FigureSpec:
    name: str
    caption: str
    needs: tuple[str, ...]  # TABLE_FILES keys
    draw: Callable[[Run], Figure]
    applies: Callable[[Run], bool] | None = None  # False: the tables hold nothing of this figure's, so it is not drawn


FIGURES = (
    FigureSpec("census_scores", "Per-head scores from the census (layer x head); the strip marks sliding and full layers.",
               ("heads",), lambda run: figures.census_scores(run.tables["heads"])),
    FigureSpec("roles", "Role labels per head; letters list every role a head has.",
               ("heads",), lambda run: figures.role_map(run.tables["heads"])),
    FigureSpec("sink_alpha", "First-token sink mass α₁ of every head, by layer; dashed line: sink threshold ε.",
               ("heads",), lambda run: figures.sink_alpha(run.tables["heads"], run.sink_rate)),
    FigureSpec("hidden_sink_tokens", "Tokens that act as hidden (non-initial) sinks, by number of events.",
               ("sinks",), lambda run: figures.hidden_sink_tokens(run.tables["sinks"])),
    FigureSpec("sink_levels", "Secondary-sink levels: creation layer against lifetime, size = number of tokens.",
               ("secondary_sinks",), lambda run: figures.secondary_sink_levels(run.tables["secondary_sinks"])),
    FigureSpec("massive_by_layer", "Largest residual-stream magnitudes per layer against the median (log scale).",
               ("massive_layers",), lambda run: figures.massive_by_layer(run.tables["massive_layers"])),
    FigureSpec("massive_locations", "Where massive activations sit: position, dimension and token, by layer.",
               ("massive",), lambda run: figures.massive_locations(run.tables["massive"])),
    FigureSpec("recall_grids", "Recall accuracy over needle depth and context length, per task and variant.",
               ("niah",), lambda run: figures.recall_grids(run.tables["niah"])),
    FigureSpec("ablation_curves", "Accuracy as the top-K heads (by score) or K random heads are ablated.",
               ("ablation",), lambda run: figures.ablation_curves(run.tables["ablation"])),
    FigureSpec("mechanism_matrix", "Which mechanisms survive each architecture, and what it costs; colour is scaled per column.",
               ("matrix",), lambda run: figures.mechanism_matrix(run.tables["matrix"])),
    FigureSpec("frontier", "Recall against decode memory and throughput, measured per architecture; star: the original, hollow: controls.",
               ("matrix", "recall"), lambda run: figures.frontier(run.tables["matrix"], run.tables["recall"])),
    FigureSpec("budget_curve", "Passkey recall against the share of heads kept exact, per selector and replacement kind; "
               "random pooled over its draws (band: range of the draws); bars: 95 % Wilson intervals.",
               ("budget",), lambda run: figures.budget_curve(run.tables["budget"], "passkey")),
    FigureSpec("budget_curve_niah", "NIAH recall against the share of heads kept exact, as above.",
               ("budget",), lambda run: figures.budget_curve(run.tables["budget"], "niah")),
)
# Figures of tables only a few directories hold (`attnprobe ladder` writes ladder.parquet): drawn where the table is,
# named when it is unreadable, and not listed as skipped in every other run's report; one whose `applies` says the
# table holds nothing for it (a ladder without head-level hybrids) is not drawn and not mentioned either.
OPTIONAL_FIGURES = (
    FigureSpec("recall_vs_tokens", "Recall against stage-2 training tokens per architecture (solid: with retrieval "
               "documents in the training data, dashed: without; dotted line and band: the original; bars: 95 % intervals), "
               "and perplexity relative to each run's control.",
               ("ladder",), lambda run: ladder.recall_vs_tokens(run.tables["ladder"])),
    FigureSpec("hybrid_budget_curve", "Head-level hybrids: recall against the share of KV heads kept exact, the rest "
               "converted, at the largest stage-2 budget (colour: selector, line style: family; random: mean of its draws, "
               "band: their range; dotted: the original, dashed: the control; bars: 95 % intervals), and perplexity "
               "relative to the control.",
               ("ladder",), lambda run: hybrid_budget.hybrid_budget_curve(run.tables["ladder"]),
               applies=lambda run: hybrid_budget.holds_hybrids(run.tables["ladder"])),
)


def render(run: Run, formats: Sequence[str] = ("png", "svg")) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Draw every figure the run's tables allow: ({name: files}, {name: why skipped})."""
    style.check_formats(formats)  # before the loop: a bad format is the user's error, not a skip
    out_dir = run.directory / "figures"
    drawn, skipped = {}, {}
    for spec in FIGURES + OPTIONAL_FIGURES:
        absent = [TABLE_FILES[need] for need in spec.needs if need not in run.tables]
        if not absent and spec.applies is not None and not spec.applies(run):  # silent, as where the table is absent
            for stale in out_dir.glob(f"{spec.name}.*"):
                stale.unlink()
            continue
        try:
            if absent:
                raise AttnprobeError(f"{', '.join(absent)} {run.problems.get(absent[0], 'not in the run directory')}")
            drawn[spec.name] = style.save(spec.draw(run), out_dir, spec.name, formats)
        except AttnprobeError as exc:
            held = not absent or any((run.directory / filename).exists() for filename in absent)
            if spec in FIGURES or held:  # an optional figure is silent where the directory lacks its table
                skipped[spec.name] = str(exc)
            for stale in out_dir.glob(f"{spec.name}.*"):  # keep figures/ in step with the report
                stale.unlink()
    return drawn, skipped


def make_figures(run_dir: Path | str, formats: Sequence[str] = ("png", "svg"),
                 on_skip: Callable[[str, str], None] | None = None) -> list[Path]:
    """Write RUN_DIR/figures/<name>.<format> for every figure the tables allow; return the files."""
    drawn, skipped = render(load_run(run_dir), formats)
    for name, reason in skipped.items():
        if on_skip is not None:
            on_skip(name, reason)
    return [path for paths in drawn.values() for path in paths]


def write_report(run_dir: Path | str, formats: Sequence[str] = ("png", "svg"),
                 on_skip: Callable[[str, str], None] | None = None) -> Path:
    """Draw the figures and write RUN_DIR/report.html: one file, images inlined, no network. `on_skip(what, why)`
    hears of every figure skipped (what: its name) and every file present but unreadable (what: the file)."""
    run = load_run(run_dir)
    drawn, skipped = render(run, tuple(dict.fromkeys(("png", *formats))))
    if on_skip is not None:
        for what, why in {**skipped, **{name: why for name, why in run.problems.items() if why.startswith("unreadable")}}.items():
            on_skip(what, why)
    body = [f"<h1>attnprobe report: {_text((run.manifest or {}).get('model_id', run.directory.name))}</h1>",
            _manifest_section(run), _figure_section(drawn, skipped), _attention_section(run.directory),
            _tables_section(run), _problems_section(run)]
    page = _PAGE.format(title=_text(f"attnprobe report: {run.directory.name}"), css=_CSS, body="\n".join(body))
    target = run.directory / "report.html"
    atomic_write_text(target, page)
    return target


# ----------------------------------------------------------------------------- HTML pieces

def _text(value) -> str:
    return html.escape(str(value))


def _manifest_section(run: Run) -> str:
    if run.manifest is None:
        return f"<h2>Run</h2><p class='skip'>manifest.json {run.problems.get('manifest.json', 'missing')}.</p>"
    rows = []
    for key, value in run.manifest.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{inner}", inner_value) for inner, inner_value in value.items()]
        else:
            rows.append((key, value))
    if run.sink_rate:
        rate = run.sink_rate
        rows.append(("sink rate", f"Sink₁^{rate.get('eps')} at T={rate.get('T')}: {rate.get('with_bos')}% with BOS, "
                                  f"{rate.get('without_bos')}% without ({rate.get('n_sequences')} sequences)"))
    cells = "".join(f"<tr><th>{_text(key)}</th><td>{_text(_short(value))}</td></tr>" for key, value in rows)
    return f"<h2>Run</h2><table class='manifest'>{cells}</table>"


def _short(value) -> str:
    if isinstance(value, list) and len(value) > 12:
        return f"{json.dumps(value[:12])[:-1]}, … ({len(value)} items)]"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _figure_section(drawn: dict[str, list[Path]], skipped: dict[str, str]) -> str:
    parts = ["<h2>Figures</h2>"]
    for spec in FIGURES + OPTIONAL_FIGURES:
        if spec.name in skipped:
            parts.append(f"<p class='skip'>Skipped <b>{spec.name}</b>: {_text(skipped[spec.name])}.</p>")
            continue
        if spec.name not in drawn:  # an optional figure whose table the run does not hold
            continue
        png = next(path for path in drawn[spec.name] if path.suffix == ".png")
        parts.append(_inline(png, spec.name, spec.caption))
    return "\n".join(parts)


def _inline(png: Path, name: str, caption: str) -> str:
    data = png.read_bytes()
    width = _png_width(data) / style.PNG_DPI * 130  # about print size on a screen
    return (f"<figure id='{_text(name)}'><img alt='{_text(name)}' style='width:{width:.0f}px' "
            f"src='data:image/png;base64,{base64.b64encode(data).decode('ascii')}'>"
            f"<figcaption><b>{_text(name)}</b>: {_text(caption)}</figcaption></figure>")


def _attention_section(directory: Path) -> str:
    """Attention maps drawn by `attnprobe figures --prompt` (they need the model, so they are not redrawn here)."""
    maps = sorted((directory / "figures").glob("attention_*.png"))
    if not maps:
        return ""
    return "\n".join(["<h2>Attention maps</h2>"] + [_inline(png, png.stem, "attention of a prompt, rows = queries") for png in maps])


def _png_width(data: bytes) -> int:
    return struct.unpack(">I", data[16:20])[0]  # IHDR width, right after the 8-byte signature and chunk header


def _summaries(run: Run) -> list[tuple[str, pd.DataFrame, str]]:
    """(heading, table, note) for each table the report shows; long tables are summarised or cut."""
    shown = []
    tables = run.tables
    if "heads" in tables:
        shown.append(("Heads (heads.parquet)", tables["heads"], ""))
    if "massive_layers" in tables:
        shown.append(("Massive activations by layer (massive_layers.parquet)", tables["massive_layers"], ""))
    for name, sort_by, heading in (("massive", "ratio", "Massive activations"), ("sinks", "alpha", "Hidden-sink events"),
                                   ("secondary_sinks", "lifetime", "Secondary sinks")):
        if name in tables:
            table = tables[name]
            if sort_by in table.columns:
                table = table.sort_values(sort_by, ascending=False, key=lambda column: column.abs())
            note = f"largest {TABLE_ROW_LIMIT} of {len(table)} rows by {sort_by}" if len(table) > TABLE_ROW_LIMIT else ""
            shown.append((f"{heading} ({TABLE_FILES[name]})", table.head(TABLE_ROW_LIMIT), note))
    niah = tables.get("niah")
    if niah is not None and {"variant", "task", "length", "correct"} <= set(niah.columns):
        summary = niah.groupby(["task", "variant", "length"])["correct"].agg(accuracy="mean", samples="size").reset_index()
        shown.append(("Recall accuracy (niah.parquet)", summary, "mean over depths and samples"))
    ablation = tables.get("ablation")
    if ablation is not None and {"task", "selection", "k", "accuracy"} <= set(ablation.columns):
        summary = (ablation.groupby(["task", "selection", "k"])["accuracy"].apply(figures.mean_ci95).apply(pd.Series)
                   .rename(columns={0: "accuracy", 1: "ci95_half_width"}).reset_index())
        shown.append(("Head ablation (ablation.parquet)", summary, "mean over seeds, 95% Student-t half width"))
    if "matrix" in tables:
        shown.append(("Mechanism-loss matrix (matrix.parquet)", tables["matrix"], ""))
    if "ladder" in tables:
        shown.append(("Training-token ladder (ladder.parquet)", tables["ladder"], "one row per run and architecture"))
    return shown


def _tables_section(run: Run) -> str:
    parts = ["<h2>Tables</h2>"]
    for heading, table, note in _summaries(run):
        for column in ("token", "hidden_sink_tokens"):
            if column in table.columns:
                table = table.assign(**{column: table[column].map(lambda text: figures.show_token(text, limit=40))})
        rendered = table.to_html(index=False, border=0, classes="data", na_rep="–",
                                 float_format=lambda value: f"{value:.4g}")
        parts.append(f"<h3>{_text(heading)}</h3>" + (f"<p class='note'>{_text(note)}</p>" if note else "")
                     + f"<div class='scroll'>{rendered}</div>")
    return "\n".join(parts)


def _problems_section(run: Run) -> str:
    if not run.problems:
        return ""
    items = "".join(f"<li>{_text(name)}: {_text(why)}</li>" for name, why in run.problems.items())
    return f"<h2>Files not used</h2><ul class='skip'>{items}</ul>"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { font-size: 1em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.9em; color: #444; }
table { border-collapse: collapse; font-size: 0.8em; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
table.manifest th, table.manifest td { text-align: left; }
.scroll { max-height: 420px; overflow: auto; border: 1px solid #eee; }
.skip { color: #a33; } .note { color: #666; font-size: 0.85em; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{css}</style></head>
<body>
{body}
</body></html>
"""
