"""Figures and report from a small synthetic run; attention maps from a tiny random Llama."""
from __future__ import annotations

import math
import re
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from fixtures_runs import write_synthetic_run
from matplotlib.image import AxesImage

from attnprobe.analyses.presentation import attention_maps, figures
from attnprobe.analyses.presentation.report import FIGURES, load_run, make_figures, write_report
from attnprobe.errors import AttnprobeError

# figure name -> (words in its title, axis labels it must carry)
EXPECTED = {
    "census_scores": ("Head census", {"head", "layer"}),
    "roles": ("Head roles", {"head", "layer"}),
    "sink_alpha": ("First-token sink", {"layer", "α₁ (attention to first token)"}),
    "hidden_sink_tokens": ("Hidden-sink tokens", {"token", "hidden-sink events (layer, head, position)"}),
    "sink_levels": ("Sink levels", {"creation layer", "lifetime (layers)"}),
    "massive_by_layer": ("Massive activations by layer", {"layer", "|activation| (residual stream)"}),
    "massive_locations": ("Where massive activations sit", {"layer", "position · dim · token"}),
    "recall_grids": ("Needle recall", {"context length (tokens)", "needle depth"}),
    "ablation_curves": ("Head ablation", {"heads ablated (K)", "accuracy"}),
    "budget_curve": ("recall against exact-head budget", {"share of KV heads exact", "passkey accuracy"}),
    "budget_curve_niah": ("recall against exact-head budget", {"share of KV heads exact", "niah accuracy"}),
    "mechanism_matrix": ("Mechanism loss by architecture", {"architecture", "mechanism present / metric"}),
    "frontier": ("What each architecture saves", {"passkey accuracy at 256 tokens", "decode tokens/s (more is faster) at 1024 tokens"}),
}


def texts(fig) -> tuple[list[str], set[str]]:
    """(titles, axis labels) of a figure, suptitle included."""
    titles = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    titles += [ax.get_title() for ax in fig.axes]
    labels = {label for ax in fig.axes for label in (ax.get_xlabel(), ax.get_ylabel()) if label}
    return titles, labels


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = write_synthetic_run(tmp_path_factory.mktemp("run") / "run")
    write_report(directory, formats=("png", "svg"))
    return directory


def test_every_figure_is_written_and_not_blank(run_dir):
    assert {spec.name for spec in FIGURES} == set(EXPECTED)
    for spec in FIGURES:
        png = run_dir / "figures" / f"{spec.name}.png"
        svg = run_dir / "figures" / f"{spec.name}.svg"
        assert png.is_file() and svg.is_file(), spec.name
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert float(pixels[..., :3].var()) > 1e-3, f"{spec.name} is blank"


def test_every_figure_has_its_title_and_axis_labels(run_dir):
    run = load_run(run_dir)
    for spec in FIGURES:
        title, labels = EXPECTED[spec.name]
        titles, found = texts(spec.draw(run))
        assert any(title in text for text in titles), (spec.name, titles)
        assert labels <= found, (spec.name, labels - found)
        svg = (run_dir / "figures" / f"{spec.name}.svg").read_text()
        assert title in svg, f"{spec.name}: title not kept as SVG text"


def test_report_is_one_self_contained_file(run_dir):
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.I)
    assert "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "synthetic-tiny" in page and "weights_sha256" in page  # the manifest
    assert "<h3>Heads (heads.parquet)</h3>" in page and "Mechanism-loss matrix" in page
    assert "87.5% with BOS" in page  # the sink rate
    assert "Skipped" not in page


def test_missing_tables_are_skipped_and_reported(tmp_path):
    omit = ("heads", "sinks", "niah", "secondary_sinks", "sink_rate", "massive", "ablation", "recall", "budget")
    directory = write_synthetic_run(tmp_path / "run", omit=omit)
    skipped = {}
    paths = make_figures(directory, formats=("png",), on_skip=skipped.__setitem__)
    assert set(skipped) == set(EXPECTED) - {"massive_by_layer", "mechanism_matrix"}
    assert "sinks.parquet not in the run directory" in skipped["hidden_sink_tokens"]
    assert sorted(path.name for path in paths) == ["massive_by_layer.png", "mechanism_matrix.png"]
    page = write_report(directory).read_text()
    assert "Skipped <b>recall_grids</b>: niah.parquet not in the run directory" in page
    assert "<li>heads.parquet: not in the run directory</li>" in page
    assert page.count("data:image/png;base64,") == 2
    assert not (directory / "figures" / "recall_grids.png").exists()


def test_malformed_tables_are_skipped_not_fatal(tmp_path):
    directory = write_synthetic_run(tmp_path / "run", omit=("niah", "ablation", "massive", "sinks"))
    heads = pd.read_parquet(directory / "heads.parquet").drop(columns=["alpha_1"])
    heads.to_parquet(directory / "heads.parquet")
    pd.DataFrame({"layer": [], "top1": [], "top2": [], "top3": [], "median": []}).to_parquet(directory / "massive_layers.parquet")
    (directory / "matrix.parquet").write_bytes(b"not parquet")
    skipped = {}
    make_figures(directory, formats=("png",), on_skip=skipped.__setitem__)
    assert "lacks columns alpha_1" in skipped["sink_alpha"]
    assert "empty" in skipped["massive_by_layer"]
    assert "unreadable" in skipped["mechanism_matrix"]
    assert "census_scores" not in skipped and "roles" not in skipped  # the other heads figures still draw


def test_pdf_on_request_and_bad_inputs(tmp_path):
    directory = write_synthetic_run(tmp_path / "run", omit=("heads", "massive", "massive_layers", "sinks", "secondary_sinks",
                                                            "niah", "ablation", "recall", "budget"))
    paths = make_figures(directory, formats=("pdf",))
    assert [path.name for path in paths] == ["mechanism_matrix.pdf"]
    assert paths[0].read_bytes().startswith(b"%PDF")
    with pytest.raises(AttnprobeError, match="unknown figure format"):
        make_figures(directory, formats=("jpg",))
    with pytest.raises(AttnprobeError, match="not found"):
        write_report(tmp_path / "nowhere")


def test_recall_grids_show_every_depth_of_each_task():
    """Passkey and NIAH have their own depths: each row of grids shows all of its task's depths."""
    rows = [{"variant": v, "task": task, "length": length, "depth": depth, "correct": True}
            for v in ("original", "sink+window") for task, depths in (("passkey", (0.0, 0.25, 0.5, 0.75)), ("niah", (0.25, 0.75)))
            for depth in depths for length in (1024, 2048)]
    fig = figures.recall_grids(pd.DataFrame(rows))
    fig.canvas.draw()
    for ax, depths in zip(fig.axes[:4], (4, 4, 2, 2)):
        assert len([t for t in ax.get_yticklabels() if t.get_text()]) in (depths, 0)
        assert abs(ax.get_ylim()[0] - ax.get_ylim()[1]) == depths


def test_mean_ci95_uses_student_t():
    mean, half = figures.mean_ci95(pd.Series([1.0, 2.0, 3.0]))
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3))
    assert figures.mean_ci95(pd.Series([0.5])) == (0.5, 0.0)


def test_prepare_map_masks_crops_and_pools():
    n = 10
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    values, labels = attention_maps.prepare_map(uniform, window=3)
    assert np.isnan(values[0, 1]) and np.isnan(values[5, 2]) and values[5, 3] == pytest.approx(1 / 6)
    values, labels = attention_maps.prepare_map(uniform, crop=(2, 6))
    assert values.shape == (4, 4) and labels == ["2", "3", "4", "5"]
    values, labels = attention_maps.prepare_map(uniform, pool=5)
    assert values.shape == (2, 2) and np.isnan(values[0, 1]) and labels == ["0", "5"]
    assert values[0, 0] == pytest.approx(np.mean([uniform[i, j] for i in range(5) for j in range(i + 1)]))
    with pytest.raises(AttnprobeError, match="crop"):
        attention_maps.prepare_map(uniform, crop=(4, 40))


class _TinyTokenizer:
    bos_token_id = 1

    def __call__(self, text):
        return SimpleNamespace(input_ids=[1] + [3 + ord(char) % 60 for char in text])

    def decode(self, ids):
        return "".join(" " if i == 3 + ord(" ") % 60 else chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import Model, describe

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = LlamaForCausalLM(config).eval()
    tokenizer = _TinyTokenizer()
    model = Model(hf, tokenizer, describe(hf, tokenizer, "tiny", "none", "test"))
    return model, make_backend("native", model)


def _image(ax) -> np.ndarray:
    return np.ma.filled(next(a for a in ax.get_children() if isinstance(a, AxesImage)).get_array(), np.nan)


def test_attention_map_from_a_tiny_llama(tiny_llama, tmp_path):
    model, backend = tiny_llama
    fig = attention_maps.attention_map(model, backend, "the cat sat", layer=1, head=2, log=True)
    titles, labels = texts(fig)
    assert "Layer 1, head 2" in titles and {"key", "query"} <= labels
    values = _image(fig.axes[0])
    assert values.shape == (12, 12)
    assert np.isnan(values[np.triu_indices(12, 1)]).all()  # the causal mask is blank
    assert np.nansum(values, axis=1) == pytest.approx(np.ones(12), abs=1e-5)  # rows are softmax rows
    assert [tick.get_text() for tick in fig.axes[0].get_xticklabels()][4] == "␣"  # tokens on the axes
    paths = figures.style.save(fig, tmp_path, "map", ("png",))
    assert float(matplotlib.image.imread(paths[0])[..., :3].var()) > 1e-3


def test_layer_grid_pooling_and_compare(tiny_llama):
    model, backend = tiny_llama
    ids = torch.randint(3, 64, (100,))
    fig = attention_maps.layer_grid(model, backend, ids, layer=0, max_tokens=32)
    maps = [_image(ax) for ax in fig.axes if any(isinstance(a, AxesImage) for a in ax.get_children())]
    assert len(maps) == model.info.n_heads and maps[0].shape == (25, 25)  # 100 tokens pooled 4 x 4
    assert np.isnan(maps[0][0, 1]) and not np.isnan(maps[0][1, 1])
    assert "Layer 0 attention" in texts(fig)[0]
    pattern, labels = attention_maps.attention_pattern(model, backend, ids[:20], layer=0)
    flat = np.tril(np.ones((20, 20))) / np.arange(1, 21)[:, None]
    fig = attention_maps.compare_maps(pattern[0], flat, labels, titles=("softmax", "uniform"))
    difference = _image(fig.axes[2])
    assert difference[5, 2] == pytest.approx(flat[5, 2] - pattern[0, 5, 2])
    assert "uniform − softmax" in texts(fig)[0]
    with pytest.raises(AttnprobeError, match="head 9 is out of range"):
        attention_maps.attention_map(model, backend, ids[:8], layer=0, head=9)


def test_token_labels_with_dollar_signs_are_drawn_literally(tmp_path):
    """SmolLM2 has a '$$' token; with mathtext on, '$x^2$' would be typeset and '$$' would fail to parse."""
    sinks = pd.DataFrame({"layer": [0, 1, 2], "head": [0, 1, 0], "position": [3, 4, 5], "token": ["$$", "$x^2$", "$$"],
                          "alpha": [0.2, 0.3, 0.4]})
    fig = figures.hidden_sink_tokens(sinks)
    labels = [tick.get_text() for tick in fig.axes[0].get_yticklabels()]
    assert labels == ["‘$$’", "‘$x^2$’"]
    svg = figures.style.save(fig, tmp_path, "dollars", ("svg", "png"))[0].read_text()
    assert "‘$x^2$’" in svg and "‘$$’" in svg  # kept as literal text, not typeset
