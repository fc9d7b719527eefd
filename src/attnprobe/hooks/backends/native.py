"""The native backend: hooks transformers' own attention call, no wrapper library.

The model's attention implementation is switched to `attnprobe`, a function registered with
transformers' AttentionInterface. For each call it takes the first of the named `PATHS` that applies:

    sdpa-passthrough    nothing to read or edit in the layer: SDPA unchanged (same numbers, same speed; a
                        float32 CUDA prefill gets its KV heads repeated: `expand_kv_heads`)
    compact-decode      a decode step over an ArchitectureCache (hooks/cache.py): softmax heads read the keys
                        their KV heads kept (one token: the split-K kernel, kernels/softmax/decode.py; else
                        SDPA), replaced heads step their own state
    fused-statistics    CUDA, pattern read only by PatternStats: SDPA (cuDNN/flash also returns the row
                        log-sum-exp) + the Triton statistics kernels, O(T) memory
    chunked-softmax     a pattern read (or a softcap): exact softmax in query chunks handed to the
                        reducers, O(chunk x T) memory
    fused-hybrid        CUDA prefill with some heads replaced by linear kernels: one Triton launch
    all-heads-replaced  every head replaced by a kernel: no softmax is computed
    sdpa                SDPA, then the layer's Z edits

Residual, attention-out and MLP-out sites use module hooks. `kernels.dispatch.force_torch` turns the
CUDA paths off.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from attnprobe.kernels.dispatch import use_triton
from attnprobe.kernels.softmax.decode import split_k_decode

from ..edits import AttentionCall, head_index
from attnprobe.errors import AttnprobeError
from ..reducers import PatternStats
from ..sites import Site
from .base import Backend, Session, chunked_softmax_attention, decoder_layers, residual_writers

IMPLEMENTATION = "attnprobe"


@dataclass
class Call:
    """One call of the attention function, as the paths see it."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    sliding_window: int | None
    softcap: float | None
    kwargs: dict
    session: Session | None
    layer: int
    window: int | None
    cache_layer: object | None = None  # a CompactLayer (hooks/cache.py) when one holds this layer's keys
    attention: AttentionCall | None = None  # what Z edits see, after the Q/K/V edits
    readers: tuple = field(default_factory=tuple)  # the layer's pattern reducers

    @property
    def edits(self):
        return self.session.edits.get((self.layer, Site.Z), ()) if self.session is not None else ()

    def sdpa(self, query=None, key=None, value=None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        query = self.query if query is None else query
        key = self.key if key is None else key
        value = self.value if value is None else value
        module = self.module
        if expand_kv_heads(query, key, self.attention_mask):
            group = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
            module = SimpleNamespace(num_key_value_groups=1, is_causal=getattr(self.module, "is_causal", True))
        z, _ = sdpa_attention_forward(module, query, key, value, self.attention_mask, scaling=self.scaling,
                                      sliding_window=self.sliding_window, **self.kwargs)
        return z


def expand_kv_heads(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether SDPA should get every query head its own copy of the keys and values.

    transformers asks SDPA for grouped-query attention whenever there is no mask, but on CUDA in
    float32 only the math kernel takes `enable_gqa`, and it forms every T x T score: 129.8 GiB for one
    32,704-token call in Qwen2.5's shape on an H200 (benchmarks/gqa_sdpa_memory.py). With the KV heads
    repeated the memory-efficient kernel serves it in 0.33 GiB (the copies cost 2 x T x heads x d)."""
    return (query.device.type == "cuda" and query.dtype == torch.float32 and attention_mask is None
            and query.shape[2] > 1 and key.shape[1] < query.shape[1])


# ---------------------------------------------------------------- paths: (applies, run) -> z (B, T, H, d)

def _untouched(c: Call) -> bool:
    return (c.session is None or c.layer not in c.session.attention_layers) and c.softcap is None


def _compact(c: Call) -> bool:
    return c.cache_layer is not None and c.cache_layer.compact and c.attention.is_decode


def _run_compact(c: Call) -> torch.Tensor:
    """Softmax heads over their own kept keys; heads whose KV head keeps nothing are all replaced and
    are written by their Z edits from their own states."""
    if c.readers or c.session.edits.get((c.layer, Site.K)) or c.session.edits.get((c.layer, Site.V)):
        raise AttnprobeError(f"layer {c.layer} has pattern reads or K/V edits, which need every key: decode it with "
                             "a DynamicCache, not an ArchitectureCache")
    query, layer_cache = c.query, c.cache_layer
    batch, heads, n_new, _ = query.shape
    z = query.new_zeros(batch, n_new, heads, c.value.shape[-1])
    if layer_cache.kept_query_heads:
        kept = head_index(layer_cache.kept_query_heads, query.device)
        if n_new == 1 and layer_cache.sliding_window is None and c.softcap is None:  # read the kept cache once, split-K
            z[:, :, kept] = split_k_decode(query[:, kept], layer_cache.kept_keys, layer_cache.kept_values,
                                           layer_cache.kept_lengths(batch), c.scaling).transpose(1, 2).to(z)
        else:
            z[:, :, kept] = c.sdpa(query[:, kept], layer_cache.kept_keys, layer_cache.kept_values).to(z)
    return z


def _fused_statistics(c: Call) -> bool:
    return (bool(c.readers) and c.softcap is None and not c.session.replaced(c.layer) and use_triton(c.query)
            and all(type(reader) is PatternStats for reader in c.readers))


def _run_fused_statistics(c: Call) -> torch.Tensor:
    """Output from SDPA, statistics from the Triton kernels: no pattern is formed."""
    from attnprobe.kernels import triton_stats

    query, key = c.query, c.key
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    n_queries, n_keys = query.shape[2], key.shape[2]
    fused = None
    if c.window is None or c.window >= n_keys:  # a fused kernel returns the row log-sum-exp beside the output
        fused = triton_stats.sdpa_with_lse(query, k, c.value, c.scaling)
    lse = None
    if fused is not None:
        out, lse = fused
        z = out.transpose(1, 2)
    else:
        z = c.sdpa()
    argmax = None
    if any(r.track_argmax for r in c.readers):
        argmax = triton_stats.last_rows_argmax(query, k, c.scaling, [n_keys - 1], c.window)[..., 0]
    if n_queries == 1 and all(r.column_sum is not None for r in c.readers):  # a decode step: argmax only
        column_sum, entries = None, {}
    else:
        diagonals = sorted({off for r in c.readers for off in r.diagonals})
        column_sum, entries = triton_stats.pattern_statistics(query, k, c.scaling, c.window, lse, diagonals)
    for reader in c.readers:
        reader.update_from_stats(column_sum, entries, n_keys - n_queries, n_keys, argmax)
    return z


def _chunked(c: Call) -> bool:
    return bool(c.readers) or c.softcap is not None


def _run_chunked(c: Call) -> torch.Tensor:
    on_chunk = c.session.chunk_reader(c.layer, c.attention) if c.session is not None else None
    rows = c.attention.query_positions - c.attention.key_offset  # chunks index the keys handed over
    z = chunked_softmax_attention(c.query, c.key, c.value, c.scaling, rows, c.window, c.softcap, on_chunk)
    return z.transpose(1, 2)


def _fused_hybrid(c: Call) -> bool:
    """CUDA prefill whose only Z edits replace some (not all, not overlapping) heads by linear kernels Triton runs."""
    from attnprobe.kernels.linear import LinearKernel

    edits, query = c.edits, c.query
    if (not edits or c.attention.is_decode or query.shape[2] != c.key.shape[2] or query.dtype == torch.float16
            or not use_triton(query)
            or not all(isinstance(e.kernel, LinearKernel) and e.kernel.fits_triton(query, c.value.shape[-1]) for e in edits)):
        return False
    replaced = [head for e in edits for head in e.heads]
    return len(set(replaced)) == len(replaced) < query.shape[1]  # all replaced: the chunked kernel alone serves best


def _run_fused_hybrid(c: Call) -> torch.Tensor:
    """All heads of the layer in one Triton launch (softmax heads over `window`, linear heads on their
    features); each edit is left the recurrent state its decode steps continue from."""
    from attnprobe.kernels.triton_linear import LINEAR, SOFTMAX, hybrid_attention

    query, key, value = c.query, c.key, c.value
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    features = {}
    for edit in c.edits:
        phi_q, phi_k = edit.kernel.features(query[:, edit.heads], k[:, edit.heads], c.scaling)
        edit.state["kernel"] = edit.kernel.state_from(phi_k, v[:, edit.heads])
        edit.state["length"] = key.shape[2]
        features.update({head: (phi_q[:, i], phi_k[:, i]) for i, head in enumerate(edit.heads)})
    linear_heads = sorted(features)
    phi_q = torch.stack([features[h][0] for h in linear_heads], dim=1)
    phi_k = torch.stack([features[h][1] for h in linear_heads], dim=1)
    modes = [LINEAR if head in features else SOFTMAX for head in range(query.shape[1])]
    return hybrid_attention(query, k, v, phi_q, phi_k, modes, c.scaling, c.window).transpose(1, 2)


def _all_replaced(c: Call) -> bool:
    """The layer's Z edits are all kernel replacements that together cover every head: the softmax
    output would be overwritten whole, so it need not be computed."""
    edits = c.edits
    return (bool(edits) and all(e.kernel is not None for e in edits)
            and {h for e in edits for h in e.heads} == set(range(c.query.shape[1])))


def _run_all_replaced(c: Call) -> torch.Tensor:
    return c.query.new_zeros(c.query.shape[0], c.query.shape[2], c.query.shape[1], c.value.shape[-1])


@dataclass(frozen=True)
class Path:
    name: str
    applies: Callable[[Call], bool]
    run: Callable[[Call], torch.Tensor]
    z_edits: bool = True  # False: the path did the layer's Z edits itself, only Z reads remain


PATHS = (
    Path("compact-decode", _compact, _run_compact),
    Path("fused-statistics", _fused_statistics, _run_fused_statistics),
    Path("chunked-softmax", _chunked, _run_chunked),
    Path("fused-hybrid", _fused_hybrid, _run_fused_hybrid, z_edits=False),
    Path("all-heads-replaced", _all_replaced, _run_all_replaced),
    Path("sdpa", lambda c: True, lambda c: c.sdpa()),
)


def attnprobe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        sliding_window=None, softcap=None, **kwargs):
    backend = getattr(module, "_attnprobe_backend", None)
    session = backend.session if backend is not None else None
    layer = module.layer_idx
    c = Call(module, query, key, value, attention_mask, scaling if scaling is not None else module.head_dim ** -0.5,
             sliding_window, softcap, dict(kwargs, dropout=dropout), session, layer,
             sliding_window if sliding_window is not None else backend.info.window(layer) if backend else None)
    cache_layer = backend.cache_layer(layer) if backend is not None else None
    if cache_layer is not None and cache_layer.compact:
        if cache_layer.built_for_edits and (session is None or layer not in session.attention_layers):
            raise AttnprobeError(f"layer {layer}'s cache was built for edits that are not on: generate inside "
                                 "backend.patched(edits) with the edits the ArchitectureCache was made from")
        c.cache_layer = cache_layer  # key, value: this call's tokens, every KV head; the kept heads' past is in the layer
    elif _untouched(c):
        if backend is not None:
            backend.paths[(layer, "sdpa-passthrough")] += 1
        return c.sdpa(), None
    # the position of key[:, :, 0]: > 0 when a cache hands over fewer keys than positions seen (a sliding
    # window, a compact layer), so replaced heads and positions count from the true start
    key_offset = backend.cache_offset(layer, c.key.shape[2]) if backend is not None else 0
    n_keys = key_offset + c.key.shape[2]
    positions = torch.arange(n_keys - query.shape[2], n_keys, device=query.device)
    if session is not None:
        c.query, c.key, c.value, c.attention = session.edit_qkv(layer, query, c.key, c.value, c.scaling, c.window,
                                                                positions, key_offset)
        c.readers = tuple(session.reads.get((layer, Site.PATTERN), ()))
    else:
        c.attention = AttentionCall(layer, query, c.key, c.value, c.scaling, c.window, positions, key_offset)
    path = next(p for p in PATHS if p.applies(c))
    if backend is not None:
        backend.paths[(layer, path.name)] += 1
    z = path.run(c).contiguous()
    if session is not None:
        z = session.apply(layer, Site.Z, z, c.attention, edits=path.z_edits)
    return z, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attnprobe_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _set_implementation(hf: torch.nn.Module, name: str) -> None:
    for module in hf.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


class NativeBackend(Backend):
    name = "native"
    keeps_edits_for_generation = True

    def __init__(self, model):
        super().__init__(model)
        self.session: Session | None = None
        self.cache = None  # the Cache of the decoder layer running now (set and cleared by its hooks)
        self.paths: Counter[tuple[int, str]] = Counter()  # (layer, path name) -> attention calls that took it
        _register()
        _set_implementation(model.hf, IMPLEMENTATION)
        self._handles = []
        for index, layer in enumerate(decoder_layers(model.hf)):
            layer.self_attn._attnprobe_backend = self
            attn_writer, mlp_writer = residual_writers(layer)
            self._handles += [
                layer.register_forward_pre_hook(self._pre_hook(index), with_kwargs=True),
                layer.register_forward_hook(self._output_hook(index, Site.RESID_POST)),
                attn_writer.register_forward_hook(self._output_hook(index, Site.ATTN_OUT)),
                mlp_writer.register_forward_hook(self._output_hook(index, Site.MLP_OUT)),
            ]

    def cache_layer(self, layer: int):
        """The compact cache layer holding `layer`'s keys in this forward, if an ArchitectureCache is in use."""
        layers = getattr(self.cache, "compact_layers", None)
        return layers[layer] if layers is not None else None

    def cache_offset(self, layer: int, n_keys: int) -> int:
        """Positions before the first of the `n_keys` keys the cache handed this layer's attention call."""
        layers = getattr(self.cache, "layers", None)
        if layers is None or layer >= len(layers):
            return 0
        return max(0, layers[layer].get_seq_length() - n_keys)

    def _pre_hook(self, layer):
        def hook(module, args, kwargs):
            self.cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if self.session is None:
                return None
            if args:
                return (self.session.apply(layer, Site.RESID_PRE, args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = self.session.apply(layer, Site.RESID_PRE, kwargs["hidden_states"])
            return args, kwargs
        return hook

    def _output_hook(self, layer, site):
        def hook(module, args, output):
            if site == Site.RESID_POST:
                self.cache = None  # held only while its layer runs: a finished generate's cache is not kept alive
            if self.session is None:
                return None
            if isinstance(output, tuple):
                return (self.session.apply(layer, site, output[0]), *output[1:])
            return self.session.apply(layer, site, output)
        return hook

    @contextmanager
    def patched(self, edits, reads=None):
        reads = dict(reads or {})
        self.check(reads, edits)
        previous, self.session = self.session, Session(reads, self.standing + list(edits))
        try:
            yield
        finally:
            self.session = previous

    def _run(self, ids, reads, edits):
        with self.patched(edits, reads), torch.no_grad():
            return self.model.hf(input_ids=ids, use_cache=False).logits.float()

    def close(self) -> None:
        """Remove the hooks and give the model back its SDPA attention."""
        for handle in self._handles:
            handle.remove()
        _set_implementation(self.model.hf, "sdpa")
