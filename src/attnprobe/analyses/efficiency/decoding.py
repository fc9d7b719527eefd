"""What a decode step and a prefill cost: tokens/s, prefill time, peak memory, the cache's bytes, the step's bytes.

    measure_decoding(model, backend, edits, context=32768, batch=8, graph=True)                      # a replacement
    measure_decoding(model, None, [], context=32768, batch=8, graph=True, attention="split-k")       # the baseline

Each measurement prefills `context - new_tokens - warmup` random tokens, decodes `warmup` tokens untimed (first
calls at these shapes) and `new_tokens` timed ones, greedily, so the cache ends at `context`.
"""
from __future__ import annotations

import contextlib
import math
import re
import time
from pathlib import Path
from typing import Sequence

import torch

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.cache import STATIC_ONLY, StaticStep, cache_nbytes, decode_cache, graph_capturable
from attnprobe.hooks.decode_attention import IMPLEMENTATIONS, static_attention
from attnprobe.hooks.edits import Edit
from attnprobe.hooks.model import Model

from .bandwidth import step_bytes

EFFICIENCY_COLUMNS = ("kv_cache_bytes_measured", "decode_tokens_per_s", "prefill_ms", "peak_memory_bytes")
ATTENTIONS = tuple(IMPLEMENTATIONS)  # the original's decode attention over a StaticCache


EFFICIENCY_COLUMNS = ("kv_cache_bytes_measured", "decode_tokens_per_s", "prefill_ms", "peak_memory_bytes")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the resident high-water mark (VmHWM) to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak(device: torch.device) -> float:
    """CUDA: peak bytes allocated since the reset; CPU: peak resident bytes of the process (Linux), else NaN."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return math.nan
    return float(found.group(1)) * 1024 if found else math.nan


class _Timer:
    """Seconds between start and stop: CUDA events on a GPU (no host sync inside the timed loop), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()
        return self

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.begin




def _check(model: Model, backend, edits, context, new_tokens, warmup, profile, graph, attention) -> None:
    if not 0 < new_tokens < context - warmup:
        raise AttnprobeError(f"decode {new_tokens} tokens within a context of {context}: choose 0 < new tokens < context - {warmup}")
    if backend is None and edits:
        raise AttnprobeError("edits need a backend: pass the native backend")
    if graph and model.device.type == "cuda" and warmup < 1:
        raise AttnprobeError("a CUDA graph is captured after at least one warm-up step: pass warmup >= 1")
    if graph and profile is not None:
        raise AttnprobeError("a profile records eager steps: measure it with graph=False")
    if graph and not graph_capturable(model, edits):
        raise AttnprobeError(STATIC_ONLY)
    if attention not in ATTENTIONS:
        raise AttnprobeError(f"unknown attention {attention!r}: choose among {', '.join(ATTENTIONS)}")
    if attention != "sdpa" and (edits or not graph):
        raise AttnprobeError(f"{attention} attention drives the original model's static step: no edits, graph=True")


@torch.no_grad()
def measure_decoding(model: Model, backend, edits: Sequence[Edit], context: int, new_tokens: int = 16,
                     batch: int = 1, seed: int = 0, warmup: int = 2, profile: Path | None = None,
                     graph: bool = False, attention: str = "sdpa") -> dict:
    """Decode through an ArchitectureCache with `edits` on (the native backend); backend=None (no edits) runs
    the model as it is: its own attention, no attnprobe hook. graph=True decodes through a StaticStep (the
    original over a StaticCache): on CUDA captured once after the warm-up as a CUDA graph and replayed, so no
    step waits for Python; on CPU run eagerly. The original's static step (hooks/decode_attention.py) prefills
    with SDPA causal over its own keys and decodes with `attention`: "sdpa" (transformers' own, over the
    buffer with its mask) or "split-k" (the bandwidth-bound kernel).
    Returns EFFICIENCY_COLUMNS: cache + state bytes at the end, decode tokens/s (over the batch), prefill ms,
    and the peak memory during both, weights included (CUDA: bytes the allocator held at most; CPU: the
    process's peak resident set, VmHWM, NaN where Linux's is absent); `step_bytes` (analyses/efficiency/
    bandwidth.py, at the final length), `decode_mode` (eager, static or cuda-graph), `attention`, and `tokens`,
    the (batch, new_tokens) greedy tokens of the timed steps. `profile`: afterwards, 4 more eager decode
    steps under torch.profiler, its table written there (and, on CUDA, the lines that synchronised the host)."""
    _check(model, backend, edits, context, new_tokens, warmup, profile, graph, attention)
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    vocab = model.hf.get_input_embeddings().weight.shape[0]
    prompt = context - new_tokens - warmup
    ids = torch.randint(3, vocab, (batch, prompt), generator=generator).to(device)
    cache = decode_cache(model, edits, context, graph)
    timer = _Timer(device)
    tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=device)

    def step(token):
        return model.hf(input_ids=token, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    _reset_peak(device)
    patched = backend.patched(edits) if backend is not None else contextlib.nullcontext()
    static_original = graph and not edits
    kernel = static_attention(model, attention) if static_original else contextlib.nullcontext()
    with patched, kernel:
        _sync(device)
        timer.start()
        token = model.hf(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        prefill = timer.stop()
        if graph:
            decode, token = _decode_static(model, edits, cache, token, prompt, warmup, tokens, timer)
        else:
            for _ in range(warmup):
                token = step(token)
            timer.start()
            for i in range(new_tokens):
                token = step(token)
                tokens[:, i:i + 1].copy_(token)
            decode = timer.stop()
        measured = {"kv_cache_bytes_measured": cache_nbytes(cache), "decode_tokens_per_s": batch * new_tokens / decode,
                    "prefill_ms": 1000 * prefill, "peak_memory_bytes": _peak(device),
                    "step_bytes": step_bytes(model, cache, edits), "attention": attention,
                    "decode_mode": "cuda-graph" if graph and device.type == "cuda" else "static" if graph else "eager",
                    "tokens": tokens.cpu()}
        if profile is not None:
            _profile_steps(step, token, device, profile)
    return measured


def _decode_static(model, edits, cache, token, prompt, warmup, tokens, timer) -> tuple[float, torch.Tensor]:
    """`warmup` static steps off the capture stream, then (CUDA) one captured as a graph; the timed steps replay
    it (CPU: run eagerly). Returns the decode seconds and the last token."""
    device = model.device
    capture = device.type == "cuda"
    static = StaticStep(model, edits, cache, token, prompt)
    side = torch.cuda.Stream(device) if capture else None
    if capture:  # the side stream starts after the prefill's kernels (it does not wait for them by itself)
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side) if capture else contextlib.nullcontext():  # warm up off the capture stream
        for _ in range(warmup):
            static()
    if capture:
        torch.cuda.current_stream(device).wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            static()
    run = cuda_graph.replay if capture else static
    timer.start()
    for i in range(tokens.shape[1]):  # the cache ends at context
        run()
        tokens[:, i:i + 1].copy_(static.token)
    return timer.stop(), static.token


def _profile_steps(step, token, device: torch.device, path: Path, steps: int = 4) -> None:
    import warnings
    from collections import Counter

    from torch.profiler import profile

    synced: Counter = Counter()
    with profile() as prof, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")  # each host sync warns, from the line that caused it
        try:
            for _ in range(steps):
                token = step(token)
            _sync(device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    synced.update(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    lines = [f"{steps} decode steps", f"host syncs per step: {sum(synced.values()) / steps:g}"]
    lines += [f"  {n / steps:g}  {where}" for where, n in synced.most_common(20)]
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=30))
    path.write_text("\n".join(lines) + "\n")
