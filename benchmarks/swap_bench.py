"""Prefill and decode wall time of swapped attention variants against the original SmolLM2-135M, on CPU.

    python benchmarks/swap_bench.py [--lengths 512 1024 2048] [--new-tokens 32] [--quick] [--out results.json]

Variants (unfitted kernels: timing does not depend on the fit): the original model; every head
replaced by elu, hedgehog, sink+window, sink+window+linear or window+linear; and a layer hybrid
that keeps every 4th layer softmax and puts hedgehog in the others. For each prompt length all
variants run back to back in one process (prefill of T tokens, then `--new-tokens` greedy decode
steps with the KV cache), so their ratios to the original share the machine's load.

The kernels are the torch reference implementations behind `backend.patched(edits)`: a replaced
layer still runs SDPA for its softmax output before the kernel overwrites the heads, so these
ratios measure the toolkit's swap path, not what an optimised kernel would cost.
State per token: a softmax layer keeps K and V (2 x KV heads x head dim floats) per token; the
swapped heads' recurrent state (measured from the edits after prefill and after decoding) stays
fixed. The HF cache itself still stores K/V for every layer (swapped heads ignore all but the
newest entry), so the memory saving is what a dedicated cache would get, reported beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import common

DEFAULT_LENGTHS = (512, 1024, 2048)
QUICK_LENGTHS = (128, 256)
HYBRID_EVERY = 4


def variants(model) -> dict[str, list]:
    from attnprobe.hooks.swap import swap_edits

    n_layers = model.info.n_layers
    hybrid_layers = [layer for layer in range(n_layers) if layer % HYBRID_EVERY]
    built = {"original": []}
    for name in ("elu", "hedgehog", "sink+window", "sink+window+linear", "window+linear"):
        built[name] = swap_edits(model, name)
    built[f"softmax every {HYBRID_EVERY}th layer, hedgehog elsewhere"] = swap_edits(model, "hedgehog", layers=hybrid_layers)
    return built


def tensor_bytes(value) -> int:
    """Bytes of every tensor inside a (nested) kernel state: dataclasses, tuples, lists, dicts."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value):
        return sum(tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def cache_bytes(cache) -> int:
    return sum(tensor_bytes(layer.keys) + tensor_bytes(layer.values) for layer in cache.layers)


@torch.no_grad()
def prefill_and_decode(model, backend, edits, ids: torch.Tensor, new_tokens: int) -> dict:
    """Time one prefill and `new_tokens` forced greedy steps (no stop token) with `edits` on."""
    with backend.patched(edits):
        start = time.perf_counter()
        out = model.hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        state_after_prefill = sum(tensor_bytes(edit.state) for edit in edits)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model.hf(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_s": decode, "state_bytes_prefill": state_after_prefill,
            "state_bytes_decode": sum(tensor_bytes(edit.state) for edit in edits),
            "hf_cache_bytes": cache_bytes(cache), "cached_tokens": ids.shape[1] + new_tokens}


def softmax_kv_bytes_per_token(model, edits) -> int:
    """K and V of the heads left softmax, per token, at the model's dtype; a GQA KV head is kept while any head of its group is."""
    info = model.info
    group = info.n_heads // info.n_kv_heads
    replaced = {edit.layer: set(edit.heads) for edit in edits}
    per_head = 2 * info.head_dim * next(model.hf.parameters()).element_size()
    kept = 0
    for layer in range(info.n_layers):
        gone = replaced.get(layer, set())
        kept += sum(1 for kv in range(info.n_kv_heads) if not set(range(kv * group, (kv + 1) * group)) <= gone)
    return kept * per_head


def measure(args) -> tuple[list[dict], dict]:
    from attnprobe.hooks.model import load_model
    from attnprobe.hooks.backends.native import NativeBackend
    from attnprobe.probe import texts

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    backend = NativeBackend(model)
    built = variants(model)
    prose = texts.haystack_ids(model.tokenizer, max(args.lengths))
    for edits in built.values():  # warm-up: one short pass per variant
        prefill_and_decode(model, backend, edits, torch.tensor([prose[:64]]), 2)
    rows = []
    for length in args.lengths:
        ids = torch.tensor([prose[:length]])
        for repeat in range(args.repeats):
            for name, edits in built.items():
                print(f"[swap_bench] T={length} repeat {repeat} {name} ...", file=sys.stderr, flush=True)
                rows.append({"variant": name, "length": length, "repeat": repeat,
                             **prefill_and_decode(model, backend, edits, ids, args.new_tokens)})
    kv = {name: softmax_kv_bytes_per_token(model, edits) for name, edits in built.items()}
    return rows, kv


def tables(rows: list[dict], kv: dict, lengths, new_tokens: int) -> str:
    best = {}
    for row in rows:  # best of the repeats
        key = (row["variant"], row["length"])
        if key not in best or row["prefill_s"] + row["decode_s"] < best[key]["prefill_s"] + best[key]["decode_s"]:
            best[key] = row
    names = list(dict.fromkeys(row["variant"] for row in rows))
    timing = []
    for length in lengths:
        base = best[("original", length)]
        for name in names:
            row = best[(name, length)]
            timing.append({"T": length, "variant": name, "prefill s": row["prefill_s"],
                           "prefill / original": row["prefill_s"] / base["prefill_s"],
                           "decode ms/tok": 1000 * row["decode_s"] / new_tokens,
                           "decode / original": row["decode_s"] / base["decode_s"]})
    longest = max(lengths)
    memory = []
    for name in names:
        row = best[(name, longest)]
        growth = (row["state_bytes_decode"] - row["state_bytes_prefill"]) / new_tokens
        memory.append({"variant": name, "KV bytes/token (softmax heads)": kv[name],
                       "kernel state bytes/token (measured over decode)": growth,
                       "fixed kernel state MB (measured)": row["state_bytes_decode"] / 2 ** 20,
                       "HF cache bytes/token (as run)": row["hf_cache_bytes"] / row["cached_tokens"],
                       f"dedicated cache MB at T={longest}": (kv[name] * longest + row["state_bytes_decode"]) / 2 ** 20})
    return "\n\n".join([
        f"### Wall time (best of the repeats; decode = {new_tokens} greedy tokens after the prefill)",
        common.markdown_table(timing, ["T", "variant", "prefill s", "prefill / original", "decode ms/tok", "decode / original"]),
        f"### State per token (fp32; kernel state measured from the edits at T={longest})",
        common.markdown_table(memory, list(memory[0]))])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", help=f"prefill lengths (default {DEFAULT_LENGTHS})")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all variants per length (best of them is reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: T=128, 256, 4 new tokens")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier ratios on a shared machine)")
    parser.add_argument("--out", type=Path, help="also write the raw rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens = 4
    args.lengths = args.lengths or list(QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    facts = common.machine_facts(args.threads)
    command = "python benchmarks/swap_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, kv = measure(args)
    facts["loadavg_end"] = common.loadavg()
    print("\n\n".join([common.header("Swapped attention vs the original on CPU (SmolLM2-135M, fp32, torch reference kernels)",
                                     facts, command.strip()),
                       f"load average at end {facts['loadavg_end']}", tables(rows, kv, args.lengths, args.new_tokens)]))
    if args.out:
        args.out.write_text(json.dumps({"machine": facts, "rows": rows, "softmax_kv_bytes_per_token": kv}, indent=1))


if __name__ == "__main__":
    main()
