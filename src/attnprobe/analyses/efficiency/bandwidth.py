"""Bytes a decode step must move, and the step's share of the memory bound.

A decode step reads every weight once (the embedding table aside, unless it is tied to the output head, which
reads all of it), every cached key and value, and every replaced head's state; a recurrent state (a linear,
gated or delta-rule head's fixed matrix) is also written back whole, while kept tokens (a softmax head's KV
cache, a window's ring buffer, sinks) are only read (one slot written, not counted). The bound is those
bytes at the GPU's peak HBM bandwidth; `hbm_share` = bytes / step time / peak.
"""
from __future__ import annotations

from typing import Sequence

from attnprobe.hooks.cache import ArchitectureCache, kv_bytes, tensor_bytes
from attnprobe.hooks.edits import Edit
from attnprobe.hooks.model import Model
from attnprobe.kernels.hybrid.kernel import HybridState
from attnprobe.kernels.softmax.kernel import KVState
from attnprobe.kernels.sparse.kernel import SparseState

# peak HBM bandwidth in bytes/s by device name (vendor data sheets: H200 4.8 TB/s, H100 SXM 3.35 TB/s)
HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12}


def hbm_peak(device_name: str) -> float | None:
    """The data-sheet peak for a GPU name, None where this table has none (then pass it: --hbm-peak)."""
    return next((peak for key, peak in HBM_PEAK.items() if key in device_name), None)


def weight_bytes(model: Model) -> int:
    """Bytes of the weights a step reads: each parameter once; an untied input embedding only by its rows (0)."""
    params = {id(p): p for p in model.hf.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embedding = model.hf.get_input_embeddings().weight
    output = model.hf.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def rewritten_bytes(state) -> int:
    """Bytes of a kernel state that a step writes back whole: the recurrent part, not the kept tokens."""
    if isinstance(state, (tuple, list)):  # a mix's states side by side
        return sum(rewritten_bytes(part) for part in state)
    if isinstance(state, HybridState):
        return tensor_bytes(state.linear)
    if isinstance(state, (KVState, SparseState)):
        return 0
    return tensor_bytes(state)


def step_bytes(model: Model, cache, edits: Sequence[Edit] = ()) -> int:
    """Bytes one decode step moves at the cache's current length: weights + keys and values + states read
    + recurrent states written."""
    states = [edit.state.get("kernel") for edit in edits]
    kept = cache.kv_bytes() if isinstance(cache, ArchitectureCache) else kv_bytes(cache)
    return weight_bytes(model) + kept + sum(tensor_bytes(s) + rewritten_bytes(s) for s in states)


def bound_columns(row: dict, peak: float | None) -> dict:
    """`bound_ms` (the step at peak bandwidth), `step_ms` (measured, per token of one sequence: the batch's
    step) and `hbm_share`, from a measured row's `step_bytes` and `decode_tokens_per_s`."""
    step_ms = 1000 * row["batch"] / row["decode_tokens_per_s"]
    if not peak:
        return {"step_ms": step_ms}
    bound_ms = 1000 * row["step_bytes"] / peak
    return {"step_ms": step_ms, "bound_ms": bound_ms, "hbm_share": bound_ms / step_ms, "times_bound": step_ms / bound_ms}

