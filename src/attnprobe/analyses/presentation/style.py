"""One figure style for the whole project: seaborn "paper" look sized for a two-column paper.

Figures are drawn at their printed size (a column is about 3.3 in, the full text width 7 in), so
the 7-8 pt fonts set here are the sizes a reader sees; nothing is shrunk afterwards.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import seaborn as sns
from matplotlib.figure import Figure

from attnprobe.errors import AttnprobeError
from attnprobe.probe.mechanisms import roles

COLUMN_WIDTH = 3.3
FULL_WIDTH = 7.0
FORMATS = ("png", "svg", "pdf")
PNG_DPI = 200

SEQUENTIAL = "viridis"  # attention, scores, accuracy: dark = low, so white can mean "masked"
MASKED_COLOR = "white"
MISSING_COLOR = "#d9d9d9"

ROLES = tuple(m.name for m in roles())  # the registry's roles, strongest claim first
ROLE_ABBREVIATIONS = {m.name: m.letter for m in roles()}
_colorblind = sns.color_palette("colorblind")
ROLE_COLORS = {role: _colorblind[index % len(_colorblind)] for index, role in enumerate(ROLES)}
ROLE_COLORS["none"] = MISSING_COLOR
LAYER_TYPE_COLORS = {"full": "#333333", "sliding": "#b8b8b8"}
SINK_CLASS_COLORS = {"primary": _colorblind[3], "secondary": _colorblind[0], "noise": "#9a9a9a"}
SELECTION_COLORS = {"top": _colorblind[3], "random": _colorblind[7]}

_RC = {
    "font.size": 7.5,
    "axes.titlesize": 8,
    "axes.labelsize": 7.5,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "legend.fontsize": 6.5,
    "legend.title_fontsize": 7,
    "figure.titlesize": 9,
    "figure.titleweight": "bold",
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": PNG_DPI,
    # no "tight" bbox: constrained layout already fits everything, and tight would draw twice
    "svg.fonttype": "none",  # keep text as text in SVG: editable and searchable
    "pdf.fonttype": 42,
    "image.cmap": SEQUENTIAL,
    "text.parse_math": False,  # token labels such as '$$' are text, never mathtext
}


def rc() -> dict:
    """The rcParams of the project style (seaborn ticks + paper context, then our sizes)."""
    params = dict(sns.axes_style("ticks"))
    params.update(sns.plotting_context("paper"))
    params.update(_RC)
    return params


def styled(build: Callable) -> Callable:
    """Decorator: draw the figure under the project style without touching global rcParams."""

    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(rc()):
            return build(*args, **kwargs)

    return wrapper


def figure_size(width: str | float = "column", height: float | None = None, aspect: float = 0.75) -> tuple[float, float]:
    """(width, height) in inches: width "column", "full" or inches; height defaults to width * aspect."""
    inches = {"column": COLUMN_WIDTH, "full": FULL_WIDTH}.get(width, width)
    if not isinstance(inches, (int, float)):
        raise AttnprobeError(f"unknown figure width {width!r}: use 'column', 'full' or a number of inches")
    return float(inches), float(height if height is not None else inches * aspect)


def new_figure(width: str | float = "column", height: float | None = None, aspect: float = 0.75) -> Figure:
    """A Figure not registered with pyplot: no GUI backend, nothing to close, safe in a library."""
    return Figure(figsize=figure_size(width, height, aspect), layout="constrained")


def check_formats(formats: Sequence[str]) -> None:
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise AttnprobeError(f"unknown figure format {', '.join(unknown) or '(none)'}: choose from {', '.join(FORMATS)}")


def save(fig: Figure, out_dir: Path, stem: str, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write `fig` as out_dir/stem.<format> for each format; return the paths."""
    check_formats(formats)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context(rc()):
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            fig.savefig(path, format=fmt, metadata=_metadata(fmt))
            paths.append(path)
    return paths


def _metadata(fmt: str) -> dict | None:
    # Drop the creation date so that the same tables give byte-identical SVG/PDF files.
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    return None
