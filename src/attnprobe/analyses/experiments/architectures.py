"""Named architectures built from a softmax model by replacing heads in place, and the
mechanism-loss matrix: which mechanisms and how much recall each architecture keeps.

Learned kernels are fitted once per kernel over every head (attention transfer) and each variant takes
the heads it replaces from that fit, so variants differ only in which heads stay softmax.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import pandas as pd

from attnprobe.hooks.backends import Backend
from attnprobe.analyses.efficiency.decoding import EFFICIENCY_COLUMNS, measure_decoding
from attnprobe.hooks.edits import Edit
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model
from attnprobe.hooks.swap import fit_heads, swap_edits
from attnprobe.kernels.fit import FitResult, load_fit, save_fit
from attnprobe.kernels.registry import make_kernel
from attnprobe.probe import texts
from attnprobe.probe.census import Census, CensusConfig, resolve_bos
from attnprobe.probe.mechanisms import mechanisms
from attnprobe.probe.perplexity import held_out_perplexity
from attnprobe.probe.rundir import RunDir, read_json, write_json, write_parquet

from attnprobe.analyses import tasks as recall_tasks
from attnprobe.analyses.stats import bootstrap_difference, cluster_bootstrap, differ, wilson_interval
from attnprobe.analyses.experiments.config import MatrixSizes
from attnprobe.analyses.experiments.variants import Variant, catalogue  # noqa: F401 (read from here by rows.py, tests)

Head = tuple[int, int]


def _saved_fit(where: Path, model: Model, tokens: int, steps: int) -> FitResult | None:
    """The fit saved in `where` if its budget (tokens, steps) and heads (every head) are this run's; else None.

    A damaged fit (truncated manifest or parameters) counts as absent: it is fitted again."""
    try:
        fit = load_fit(where, model.info.weights_sha256)
    except AttnprobeError:
        raise  # fitted on other weights: the user must choose
    except Exception:  # truncated JSON or safetensors: refit
        return None
    every_head = {layer: list(range(model.info.n_heads)) for layer in range(model.info.n_layers)}
    same = fit.steps == steps and fit.tokens == tokens and {int(k): list(v) for k, v in fit.heads.items()} == every_head
    return fit if same else None


def fitted_kernel(model: Model, backend: Backend, kernel: str, fit_dir: Path, tokens: int, steps: int,
                  bos: bool = False) -> FitResult | str:
    """A fit over every head, loaded from `fit_dir/kernel` when it was made with this budget, or made and saved there;
    a name for parameter-free kernels.

    The teacher pass reads the fit text range (never evaluated on) in rows of up to 512 tokens,
    with BOS when the run uses it, as every evaluation of the run does."""
    if not make_kernel(kernel, 1, model.info.head_dim).learnable:
        return kernel
    where = fit_dir / kernel.replace("+", "_")
    ids = texts.windows(texts.fit_ids(model.tokenizer, tokens), min(512, tokens), model.info.bos_id if bos else None)
    if (where / "manifest.json").exists():
        saved = _saved_fit(where, model, ids.numel(), steps)
        if saved is not None:
            return saved
    result = fit_heads(backend, ids, kernel, list(range(model.info.n_layers)), steps=steps, progress=True)
    save_fit(result, where, model.info.weights_sha256)
    return result


def variant_edits(model: Model, kernel: FitResult | str | None, keep: set[Head]) -> list[Edit]:
    if kernel is None:
        return []
    edits = []
    for layer in range(model.info.n_layers):
        replaced = [h for h in range(model.info.n_heads) if (layer, h) not in keep]
        if replaced:
            edits += swap_edits(model, kernel, layers=[layer], heads=replaced)
    return edits


def cache_bytes_per_token(model: Model, keep: set[Head], kernel: str | None, bytes_per_value: int = 2, **options) -> tuple[int, int]:
    """(bytes per token that grow with context, fixed state bytes) at `bytes_per_value` (fp16/bf16), as the
    architecture's cache (`hooks.cache`) holds them.

    A KV head caches K and V for every token while any of its query heads is softmax (a sliding layer's
    window, which is fixed); a KV head whose query heads are all replaced keeps none. Each replaced query head
    keeps its kernel's own state (`Kernel.state_numbers`); the tokens the kernel keeps (a hybrid's sinks and
    window, a sparse head's cache) are kept once per KV head its replaced heads read (`Kernel.share_kv`).
    (A feature-map state also keeps one log-scale number per head, not counted.)"""
    info = model.info
    group = info.n_heads // info.n_kv_heads
    replacement = make_kernel(kernel, 1, info.head_dim, **options) if kernel else None
    per_token, fixed = 0, 0
    kv_numbers = 2 * info.head_dim * bytes_per_value  # K and V of one token
    for layer in range(info.n_layers):
        replaced = {h for h in range(info.n_heads) if replacement is not None and (layer, h) not in keep}
        for kv in range(info.n_kv_heads):
            if set(range(kv * group, (kv + 1) * group)) <= replaced:
                continue
            window = info.window(layer)  # None in a full layer: every token
            if window is None:
                per_token += kv_numbers
            else:
                fixed += kv_numbers * window
        if replaced:
            read = len({head // group for head in replaced})  # KV heads whose tokens the replaced heads keep
            if replacement.cached_tokens is None:
                per_token += read * kv_numbers
            else:
                fixed += read * kv_numbers * replacement.cached_tokens
            fixed += len(replaced) * replacement.state_numbers(info.head_dim) * bytes_per_value
    return per_token, fixed


def _accuracy_columns(rows: pd.DataFrame, names=recall_tasks.DEFAULT) -> dict:
    """Per task of `names`: accuracy, its 95 % interval and n. Samples are independent: a Wilson
    interval. A teacher-forced task (copying) scores strings: its accuracy is the share of tokens
    right, its interval a bootstrap over strings and n the number of strings."""
    out = {}
    for name in names:
        task, group = recall_tasks.task(name), rows[rows["task"] == name]
        n = len(group)
        if task.teacher_forced and n:
            scored = group["length"].sub(1)  # tokens scored per string: all but its first
            accuracy, low, high = cluster_bootstrap((group["token_accuracy"] * scored).tolist(), scored.tolist())
        else:
            correct = int(group["correct"].sum()) if n else 0
            accuracy, (low, high) = correct / n if n else math.nan, wilson_interval(correct, n)
        out.update({f"{task.column}_acc": accuracy, f"{task.column}_ci_low": low, f"{task.column}_ci_high": high,
                    f"{task.column}_n": n})
    return out


def census_presence(model: Model, backend: Backend, out: Path, sizes: MatrixSizes, bos: bool) -> dict:
    """Re-run a small census on the (edited) model, with the run's BOS convention, and say which
    mechanisms are still there (the registry's matrix columns; retrieval adds how many samples were
    accepted and the teacher-forced count, see `probe.retrieval`)."""
    config = CensusConfig(bos="on" if bos else "off", sink_sequences=20, prose_sequences=1, prose_length=256,
                          lengths=list(sizes.census_lengths), depths=[0.25, 0.75], needles=2,
                          induction_length=sizes.census_induction_length)
    in_matrix = [m for m in mechanisms() if m.matrix]
    heads = Census(model, backend, config, out).execute(tuple(dict.fromkeys(m.stage for m in in_matrix)))
    return {key: value for m in in_matrix for key, value in m.matrix_columns(out, heads, config.thresholds).items()}


def efficiency_columns(model: Model, backend: Backend, edits: list[Edit], sizes: MatrixSizes,
                       progress: Callable[[str], None] = lambda m: None) -> dict:
    """Measured cost of decoding with the architecture's own cache, one column per measure and context:
    `kv_cache_bytes_measured_2048`, ... (NaN past the model's window: benchmarks/decode_bench.py measures those)."""
    columns = {}
    for context in sizes.efficiency_contexts:
        fits = not model.info.max_context or context <= model.info.max_context
        if fits:
            progress(f"decoding at {context} tokens")
        measured = measure_decoding(model, backend, edits, context, sizes.decode_tokens) if fits else {}
        columns.update({f"{column}_{context}": measured.get(column, math.nan) for column in EFFICIENCY_COLUMNS})
    return columns


def evaluate_variant(model: Model, backend: Backend, variant: Variant, heads: pd.DataFrame | None, out: Path,
                     sizes: MatrixSizes, progress: Callable[[str], None] = lambda m: None,
                     fit: FitResult | None = None) -> tuple[dict, pd.DataFrame]:
    """Recall, perplexity and (optionally) a census of one architecture: (matrix row, recall rows).
    `fit`: kernels converted elsewhere (`attnprobe convert`); without it learned kernels are fitted here.

    Every pass uses the run's one BOS convention; fitting reads the fit text range, perplexity the
    perplexity range and NIAH the evaluation range with needles the census does not rank with.
    The text ranges used are written to `out/texts.json`."""
    bos = resolve_bos(sizes.bos, model)
    recall_tasks.preflight(model, sizes.tasks, sizes, sizes.allow_small)  # window and sample counts, before any fit
    with texts.recording() as used:
        row, rows = _evaluate(model, backend, variant, heads, out, sizes, bos, progress, fit)
    _record_texts(out / "texts.json", used)
    return row, rows


def _record_texts(path: Path, used: list[dict]) -> None:
    earlier = json.loads(path.read_text()) if path.exists() else []
    write_json(path, texts.summarise(earlier + used))


def _evaluate(model, backend, variant, heads, out, sizes, bos, progress, fit=None):
    keep = variant.keep(model, heads)
    kernel = fit
    if kernel is None and variant.kernel:
        kernel = fitted_kernel(model, backend, variant.kernel, out / "fits", sizes.fit_tokens, sizes.fit_steps, bos)
    edits = variant_edits(model, kernel, keep)
    name = variant.name
    with backend.patched(edits):
        rows = recall_tasks.run_sized(model, sizes.tasks, sizes, name, bos, progress)
    progress(f"{name}: perplexity")
    ppl = held_out_perplexity(backend, sizes.perplexity_tokens, sizes.perplexity_length, model.info.bos_id if bos else None, edits)
    per_token, fixed = cache_bytes_per_token(model, keep, variant.kernel)
    row = {"architecture": name, "description": variant.description, "kernel": variant.kernel or "softmax",
           "softmax_heads": len(keep) if variant.kernel else model.info.n_layers * model.info.n_heads, "bos": bos,
           **_accuracy_columns(rows, sizes.tasks), "perplexity": ppl, "state_bytes_per_token": per_token, "fixed_state_bytes": fixed}
    row.update(efficiency_columns(model, backend, edits, sizes, progress=lambda m: progress(f"{name}: {m}")))
    if sizes.census:
        progress(f"{name}: census")
        with backend.standing_edits(edits):
            row.update(census_presence(model, backend, out / "census" / name, sizes, bos))
    return row, rows


def _readable(*paths: Path) -> bool:
    try:
        for path in paths:
            read_json(path) if path.suffix == ".json" else pd.read_parquet(path)
        return True
    except Exception:  # a truncated file: the variant is evaluated again
        return False


def run_matrix(model: Model, backend: Backend, variants: list[Variant], heads: pd.DataFrame | None, out: Path,
               sizes: MatrixSizes, command: str = "matrix", progress: Callable[[str], None] = lambda m: None,
               on_row: Callable[[dict], None] = lambda row: None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate `variants` into `out`, each saved under variants/ the moment it finishes, and write the
    matrix (matrix.parquet, matrix.md, recall.parquet, niah.parquet). A rerun resumes: finished variants with
    the same settings are read back, damaged ones redone; a directory holding a swap with other settings
    (weights, sizes, fit budget, or a variant's kernel or softmax heads) is refused."""
    settings = {"command": command, "weights_sha256": model.info.weights_sha256, "sizes": asdict(sizes),
                "variants": {v.name: {"kernel": v.kernel, "keep": sorted(map(list, v.keep(model, heads)))} for v in variants}}
    with RunDir(out).lock():
        return _run_matrix(model, backend, variants, heads, out, sizes, settings, progress, on_row)


def _run_matrix(model, backend, variants, heads, out, sizes, settings, progress, on_row):
    _check_settings(out, json_ready(settings))
    rows, recall_rows = [], []
    for variant in variants:
        done, samples_path = out / "variants" / f"{variant.name}.json", out / "variants" / f"{variant.name}.parquet"
        if done.exists() and _readable(done, samples_path):
            rows.append(read_json(done))
            recall_rows.append(pd.read_parquet(samples_path))
            continue
        row, samples = evaluate_variant(model, backend, variant, heads, out, sizes, progress)
        samples = samples.drop(columns=["response"], errors="ignore")
        write_parquet(samples_path, samples)
        write_json(done, row)
        rows.append(row)
        recall_rows.append(samples)
        on_row(row)
    recall_table = pd.concat(recall_rows, ignore_index=True)
    table = differences_from(pd.DataFrame(rows), recall_table, sizes.tasks)
    write_parquet(out / "matrix.parquet", table)
    write_parquet(out / "recall.parquet", recall_table)
    grids = [t.name for t in recall_tasks.tasks() if t.grid]  # depth x length tasks
    write_parquet(out / "niah.parquet", recall_table[recall_table["task"].isin(grids)])
    (out / "matrix.md").write_text(matrix_markdown(table))
    return table, recall_table


def json_ready(value):
    """`value` as it reads back from JSON (tuples become lists), so saved and new settings compare equal."""
    import json

    return json.loads(json.dumps(value))


def _check_settings(out: Path, wanted: dict) -> None:
    """Refuse a directory whose finished variants were made with other settings; unfinished work never blocks."""
    path = out / "shards" / "swap.json"
    try:
        previous = read_json(path) if path.exists() else None
    except ValueError:  # truncated by a crash: the variants' own files say what is done
        previous = None
    finished = {p.stem for p in (out / "variants").glob("*.json")} if (out / "variants").is_dir() else set()
    if previous is not None and finished:
        old, new = previous.get("variants", {}), wanted["variants"]
        if previous.get("weights_sha256") != wanted["weights_sha256"] or previous.get("sizes") != wanted["sizes"]:
            raise AttnprobeError(f"{out} holds a swap with other model weights or sizes (fit budget, recall sizes): use a new --out")
        clash = sorted(name for name in finished & set(new) if old.get(name, new[name]) != new[name])
        if wanted["command"] == "swap" or previous.get("command") == "swap":
            clash += sorted(finished - set(new))
        if clash:
            raise AttnprobeError(f"{out} holds a swap with other settings ({', '.join(clash)}: kernel or heads): use a new --out")
        wanted = {**wanted, "variants": {**{k: v for k, v in old.items() if k in finished}, **new}}
    write_json(path, wanted)


def differs(recall: pd.DataFrame, name: str, first: str, second: str) -> bool | None:
    """Whether variants `first` and `second` differ on task `name` at 0.05, paired: both answered the
    same prompts (same task, length, depth and sample). Exact McNemar on `correct`; a teacher-forced
    task by a paired bootstrap of its strings' token accuracy (its interval excludes 0). None when the
    two did not answer the same prompts."""
    keys = ["length", "depth", "sample"]
    rows = recall[recall["task"] == name]
    a, b = (rows[rows["variant"] == v].sort_values(keys).reset_index(drop=True) for v in (first, second))
    if a.empty or not a[keys].fillna(-1).equals(b[keys].fillna(-1)):
        return None
    if recall_tasks.task(name).teacher_forced:
        _, low, high = bootstrap_difference(a["token_accuracy"].tolist(), b["token_accuracy"].tolist(), paired=True)
        return not low <= 0 <= high
    return differ(a["correct"].tolist(), b["correct"].tolist(), paired=True)


def differences_from(table: pd.DataFrame, recall: pd.DataFrame, names, reference: str = "original") -> pd.DataFrame:
    """The matrix with `<column>_differs` per task: whether the row differs from `reference` at 0.05 (`differs`)."""
    if reference not in set(table["architecture"]):
        return table
    table = table.copy()
    for name in names:
        column = recall_tasks.task(name).column
        table[f"{column}_differs"] = [None if arch == reference else differs(recall, name, arch, reference)
                                      for arch in table["architecture"]]
    return table


def matrix_markdown(table: pd.DataFrame) -> str:
    """matrix.md: one row per architecture, each accuracy as 'acc (low-high, n)' with its 95 % interval,
    starred where it differs from the original at 0.05 (`differs`)."""
    shown = table.drop(columns=["description"], errors="ignore").copy()
    starred = False
    for prefix in [c[:-len("_acc")] for c in shown.columns if c.endswith("_acc") and f"{c[:-4]}_ci_low" in shown]:
        marks = shown[f"{prefix}_differs"] if f"{prefix}_differs" in shown else [None] * len(shown)
        shown[f"{prefix}_acc"] = [f"{a:.2f} ({lo:.2f}-{hi:.2f}, n={n})" + (" *" if mark is True else "") if n else "n/a"
                                  for a, lo, hi, n, mark in zip(shown[f"{prefix}_acc"], shown[f"{prefix}_ci_low"],
                                                                shown[f"{prefix}_ci_high"], shown[f"{prefix}_n"], marks)]
        starred |= any(mark is True for mark in marks)
        shown = shown.drop(columns=[f"{prefix}_ci_low", f"{prefix}_ci_high", f"{prefix}_n", f"{prefix}_differs"], errors="ignore")
    note = "\n\\* differs from the original at p < 0.05 (paired: the same prompts; exact McNemar, copying a paired bootstrap)\n"
    return shown.to_markdown(index=False, floatfmt=".3g") + "\n" + (note if starred else "")


GATE_HYBRID, GATE_LINEAR = 1.10, 1.25  # perplexity / control's perplexity


def gate(perplexity: float, control_perplexity: float, softmax_fraction: float) -> dict:
    """The acceptance gate of a converted row: held-out perplexity within 1.10x of the fine-tuned control for
    hybrids keeping at least a quarter of their heads softmax, within 1.25x for the rest (pure linear rows)."""
    limit = GATE_HYBRID if softmax_fraction >= 0.25 else GATE_LINEAR
    ratio = perplexity / control_perplexity
    return {"gate_ratio": ratio, "gate_limit": limit, "gate": "pass" if ratio <= limit else "FAIL"}


def gate_columns(table: pd.DataFrame, total_heads: int, control: str = "control", original: str = "original") -> pd.DataFrame:
    """Add perplexity relative to the original and to the control, and the gate, to a matrix with those two rows
    (a matrix without them is returned as it is).

    The reference rows themselves get gate "reference"; a row failing the gate keeps its recall numbers."""
    table = table.copy()
    by_name = table.set_index("architecture")["perplexity"]
    if control not in by_name or original not in by_name:
        return table  # no reference to gate against
    table["ppl_vs_original"] = table["perplexity"] / by_name[original]
    table["ppl_vs_control"] = table["perplexity"] / by_name[control]
    gates = [gate(row.perplexity, by_name[control], row.softmax_heads / total_heads) if row.architecture not in (control, original)
             else {"gate_ratio": math.nan, "gate_limit": math.nan, "gate": "reference"} for row in table.itertuples()]
    return pd.concat([table, pd.DataFrame(gates, index=table.index)], axis=1)
