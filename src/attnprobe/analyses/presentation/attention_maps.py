"""Attention maps: a head's pattern on a prompt, a layer's grid of heads, and a head beside the kernel that
replaces it. The only figures that run a model."""
from __future__ import annotations
import math
import warnings
from collections.abc import Sequence
import numpy as np
import seaborn as sns
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site
from attnprobe.analyses.presentation import style
from attnprobe.analyses.presentation.figures import show_token
from attnprobe.analyses.presentation.style import styled


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable axis labels for token ids: decoded text, else the vocabulary piece, else the id."""
    labels = []
    for token_id in ids:
        if hasattr(tokenizer, "decode"):
            text = tokenizer.decode([token_id])
        elif hasattr(tokenizer, "convert_ids_to_tokens"):
            text = tokenizer.convert_ids_to_tokens(token_id)
        else:
            text = str(token_id)
        labels.append(show_token(text, limit=10))
    return labels


def _as_ids(model, prompt_or_ids):
    import torch

    if isinstance(prompt_or_ids, str):
        ids = torch.tensor([model.tokenizer(prompt_or_ids).input_ids])
    else:
        ids = torch.as_tensor(prompt_or_ids).long()
        ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise AttnprobeError(f"attention maps take one sequence; got ids of shape {tuple(ids.shape)}: pass a string or 1-D ids")
    return ids


def attention_pattern(model, backend, prompt_or_ids, layer: int) -> tuple[np.ndarray, list[str]]:
    """Softmax pattern (H, T, T) of `layer` for one sequence, with token labels (native backend read)."""
    ids = _as_ids(model, prompt_or_ids)
    reader = Keep()
    backend.run(ids, reads={(layer, Site.PATTERN): reader})
    return reader.result()[0].numpy(), token_labels(model.tokenizer, ids[0].tolist())


def _check_head(model, head: int) -> None:
    if not 0 <= head < model.info.n_heads:
        raise AttnprobeError(f"head {head} is out of range: this model has heads 0-{model.info.n_heads - 1}")


def prepare_map(pattern, labels: Sequence[str] | None = None, window: int | None = None,
                crop: tuple[int, int] | None = None, pool: int | None = None, max_tokens: int = 64):
    """Mask (NaN) what a query cannot see, crop to [start, stop), average-pool blocks; returns (values, labels).

    Long inputs are pooled automatically to at most `max_tokens` cells per side. A pooled cell is the
    mean over the entries its queries can see, so blocks on the diagonal are not diluted by the mask."""
    values = np.asarray(pattern.detach().cpu() if hasattr(pattern, "detach") else pattern, dtype=np.float64)
    n = values.shape[-1]
    labels = list(labels) if labels is not None else [str(position) for position in range(n)]
    query, key = np.indices((n, n))
    visible = key <= query
    if window is not None:
        visible &= query - key < window
    values = np.where(visible, values, np.nan)
    start, stop = crop if crop is not None else (0, n)
    if not 0 <= start < stop <= n:
        raise AttnprobeError(f"crop {crop} is outside 0-{n}: pass (start, stop) with 0 <= start < stop <= {n}")
    values, labels = values[start:stop, start:stop], labels[start:stop]
    size = stop - start
    pool = pool or math.ceil(size / max_tokens)
    if pool > 1:
        blocks = math.ceil(size / pool)
        padded = np.full((blocks * pool, blocks * pool), np.nan)
        padded[:size, :size] = values
        with warnings.catch_warnings():  # an all-masked block is NaN by design
            warnings.simplefilter("ignore", category=RuntimeWarning)
            values = np.nanmean(padded.reshape(blocks, pool, blocks, pool), axis=(1, 3))
        labels = [f"{start + b * pool}" for b in range(blocks)]
    return values, labels


def _are_positions(labels: Sequence[str]) -> bool:
    return all(str(label).isdigit() for label in labels)


LABEL_PITCH = 0.09  # inches per 5.5 pt tick label: closer than this and token labels overlap


def plot_map(ax, values: np.ndarray, labels: Sequence[str], panel_inches: float, log: bool = False,
             vmax: float | None = None, cmap=None, norm=None):
    """Draw a prepared map on `ax` (masked cells blank); a label for every token when a
    `panel_inches`-wide panel has room, else for every k-th."""
    cmap = sns.color_palette(cmap or style.SEQUENTIAL, as_cmap=True).with_extremes(bad=style.MASKED_COLOR)
    if norm is None:
        top = vmax if vmax is not None else float(np.nanmax(values))
        norm = LogNorm(vmin=max(top * 1e-4, 1e-8), vmax=top, clip=True) if log else Normalize(vmin=0, vmax=top)
    image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    n = len(labels)
    step = max(1, math.ceil(n * LABEL_PITCH / panel_inches))
    if _are_positions(labels):  # pooled or unlabelled: a few position ticks read better than many
        step = max(step, math.ceil(n / 8))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90)
    ax.set_yticks(ticks, [labels[i] for i in ticks])
    ax.tick_params(length=1.5, labelsize=5.5)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return image


@styled
def attention_map(model, backend, prompt_or_ids, layer: int, head: int, *, log: bool = False,
                  crop: tuple[int, int] | None = None, pool: int | None = None, max_tokens: int = 64) -> Figure:
    """One head's attention pattern: tokens on the axes, the causal mask blank, linear or log colour."""
    _check_head(model, head)
    pattern, labels = attention_pattern(model, backend, prompt_or_ids, layer)
    values, labels = prepare_map(pattern[head], labels, model.info.window(layer), crop, pool, max_tokens)
    fits = _are_positions(labels) or len(labels) * LABEL_PITCH <= style.COLUMN_WIDTH - 1.2
    width = style.COLUMN_WIDTH if fits else style.FULL_WIDTH
    fig = style.new_figure(width, aspect=0.92)  # a long prompt gets the full text width for its labels
    ax = fig.add_subplot()
    image = plot_map(ax, values, labels, width - 1.2, log=log)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention" + (" (log)" if log else ""))
    ax.set_title(f"Layer {layer}, head {head}" + (" (sliding window)" if model.info.window(layer) else ""))
    return fig


@styled
def layer_grid(model, backend, prompt_or_ids, layer: int, heads: Sequence[int] | None = None, *, log: bool = False,
               crop: tuple[int, int] | None = None, pool: int | None = None, max_tokens: int = 48,
               columns: int = 4) -> Figure:
    """Every head (or `heads`) of one layer side by side, one colour scale; one model run."""
    heads = list(range(model.info.n_heads)) if heads is None else list(heads)
    for head in heads:
        _check_head(model, head)
    pattern, labels = attention_pattern(model, backend, prompt_or_ids, layer)
    maps = [prepare_map(pattern[head], labels, model.info.window(layer), crop, pool, max_tokens) for head in heads]
    vmax = max(float(np.nanmax(values)) for values, _ in maps)
    columns = min(columns, len(heads))
    rows = math.ceil(len(heads) / columns)
    fig = style.new_figure("full", height=0.4 + rows * style.FULL_WIDTH / columns * 0.95)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, head, (values, head_labels) in zip(axes, heads, maps):
        image = plot_map(ax, values, head_labels, style.FULL_WIDTH / columns - 0.5, log=log, vmax=vmax)
        ax.set_title(f"head {head}")
    for index, ax in enumerate(axes):
        if index >= len(heads):
            ax.set_visible(False)
            continue
        if index % columns:
            ax.set_ylabel("")
        if index + columns < len(heads):  # another panel sits below: its label says "key"
            ax.set_xlabel("")
    fig.colorbar(image, ax=axes[: len(heads)].tolist(), shrink=0.6, label="attention" + (" (log)" if log else ""))
    fig.suptitle(f"Layer {layer} attention" + (" (sliding window)" if model.info.window(layer) else ""))
    return fig


@styled
def compare_maps(original, replaced, labels: Sequence[str] | None = None, *, log: bool = False,
                 window: int | None = None, crop: tuple[int, int] | None = None, pool: int | None = None,
                 titles: tuple[str, str] = ("original", "replaced"), max_tokens: int = 48) -> Figure:
    """Two (T, T) maps of one head (e.g. softmax vs a linear replacement) and their difference."""
    first, shown = prepare_map(original, labels, window, crop, pool, max_tokens)
    second, _ = prepare_map(replaced, labels, window, crop, pool, max_tokens)
    if first.shape != second.shape:
        raise AttnprobeError(f"maps differ in shape {first.shape} vs {second.shape}: compare the same head on the same input")
    fig = style.new_figure("full", height=2.9)
    axes = fig.subplots(1, 3)
    vmax = max(float(np.nanmax(first)), float(np.nanmax(second)))
    for ax, values, title in zip(axes[:2], (first, second), titles):
        image = plot_map(ax, values, shown, 1.9, log=log, vmax=vmax)
        ax.set_title(title)
    fig.colorbar(image, ax=axes[:2].tolist(), shrink=0.7, location="bottom", label="attention" + (" (log)" if log else ""))
    difference = second - first
    limit = float(np.nanmax(np.abs(difference))) or 1.0
    image = plot_map(axes[2], difference, shown, 1.9, cmap="vlag", norm=Normalize(-limit, limit))
    axes[2].set_title(f"{titles[1]} − {titles[0]}")
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.colorbar(image, ax=axes[2], shrink=0.7, location="bottom", label="difference")
    fig.suptitle("Attention pattern comparison")
    return fig


def attention_figures(model, backend, prompt: str, layer: int | None, head: int | None, kernel: str | None,
                      out_dir, log: bool = False, formats: Sequence[str] = ("png", "svg")) -> list:
    """Draw a prompt's attention maps into `out_dir`: the layer's heads (attention_L{layer}), one head
    (attention_L{layer}H{head}) and that head against `kernel` in its place; returns the files."""
    from attnprobe.hooks.swap import swap_edits

    if not prompt.strip():
        raise AttnprobeError("--prompt is empty: give some text to draw the attention of")
    layer = model.info.n_layers // 2 if layer is None else layer
    if not 0 <= layer < model.info.n_layers:
        raise AttnprobeError(f"layer {layer} is out of range: this model has layers 0-{model.info.n_layers - 1}")
    if head is not None:
        _check_head(model, head)
    elif kernel is not None:
        raise AttnprobeError("--kernel compares one head with a kernel in its place: add --head")
    paths = style.save(layer_grid(model, backend, prompt, layer, log=log), out_dir, f"attention_L{layer}", formats)
    if head is not None:
        paths += style.save(attention_map(model, backend, prompt, layer, head, log=log), out_dir, f"attention_L{layer}H{head}", formats)
        if kernel is not None:
            edits = swap_edits(model, kernel, layers=[layer], heads=[head])  # an unknown kernel is refused before drawing
            original, labels = attention_pattern(model, backend, prompt, layer)
            with backend.standing_edits(edits):
                replaced, _ = attention_pattern(model, backend, prompt, layer)
            fig = compare_maps(original[head], replaced[head], labels, log=log, titles=("softmax", kernel))
            paths += style.save(fig, out_dir, f"attention_L{layer}H{head}_{kernel.replace('+', '_')}", formats)
    return paths
