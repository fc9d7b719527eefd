"""The native backend: hooks transformers' own attention call, no wrapper library.

The model's attention implementation is switched to `attnprobe`, a function registered with
transformers' AttentionInterface. Layers with nothing to read or edit go straight to SDPA (same
numbers, same speed). A layer whose pattern is read computes softmax attention in chunks of query
rows, hands each chunk to the reducers and builds the output from the same chunk, so memory stays
O(chunk x T) instead of O(T^2). On CUDA, a layer read only by `PatternStats` skips the chunks: SDPA
computes the output (its cuDNN or flash kernel also returns the row log-sum-exp) and the Triton kernels of
`kernels.triton_stats` compute the statistics from q, k and that log-sum-exp in O(T) memory
(`kernels.dispatch.force_torch` turns this off). Likewise a prefill whose layer has some heads replaced
by linear kernels runs the whole layer in one Triton hybrid launch. Residual, attention-out and MLP-out
sites use module hooks.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from attnprobe.kernels.attention_stats import allowed_keys as causal_allowed
from attnprobe.kernels.dispatch import use_triton

from .backend import Backend
from .edits import AttentionCall
from .reducers import PatternStats
from .sites import Site

IMPLEMENTATION = "attnprobe"
ATTENTION_SITES = (Site.Q, Site.K, Site.V, Site.PATTERN, Site.Z)
CHUNK_ELEMENTS = 1 << 25  # score elements per query chunk (128 MB in fp32)
MAX_CHUNK_ROWS = 256  # small enough chunks that causal skipping drops most of the upper triangle


class Session:
    def __init__(self, reads, edits):
        self.reads = defaultdict(list)
        for (layer, site), reducer in reads.items():
            self.reads[(layer, site)].append(reducer)
        self.edits = defaultdict(list)
        for edit in edits:
            self.edits[(edit.layer, edit.site)].append(edit)
        self.attention_layers = {layer for (layer, site) in list(self.reads) + list(self.edits) if site in ATTENTION_SITES}

    def edit_qkv(self, layer, query, key, value, scaling, window, positions):
        """Apply Q/K/V edits and reads; return the (possibly edited) q, k, v and their AttentionCall."""
        call = AttentionCall(layer, query, key, value, scaling, window, positions)
        query = self.apply(layer, Site.Q, query, call)
        key = self.apply(layer, Site.K, key, call)
        value = self.apply(layer, Site.V, value, call)
        return query, key, value, AttentionCall(layer, query, key, value, scaling, window, positions)

    def apply(self, layer, site, tensor, call=None, edits: bool = True):
        for edit in self.edits.get((layer, site), ()) if edits else ():
            tensor = edit.fn(tensor, call)
        for reducer in self.reads.get((layer, site), ()):
            reducer.update(tensor)
        return tensor


def decoder_layers(hf: torch.nn.Module):
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model
    return decoder.layers


def residual_writers(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Modules whose outputs are what the block adds to the residual stream (attention, MLP)."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: sandwich norms after each sublayer
        return layer.post_attention_layernorm, layer.post_feedforward_layernorm
    return layer.self_attn, layer.mlp




def chunked_softmax_attention(q, k, v, scaling, query_positions, window=None, softcap=None, on_chunk=None):
    """Exact causal softmax attention in query chunks: z (B, H, T, d); `on_chunk(p, rows)` sees each chunk."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    batch, heads, n_queries, _ = q.shape
    chunk = max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, batch * heads * k.shape[2])))
    n_keys = k.shape[2]
    k, v = k.float(), v.float()
    out = []
    for start in range(0, n_queries, chunk):
        rows = query_positions[start:start + chunk]
        # only keys some query of the chunk can see: causal (and window) masking skips the rest
        high = int(rows[-1]) + 1
        low = max(0, int(rows[0]) - window + 1) if window is not None else 0
        scores = torch.matmul(q[:, :, start:start + chunk].float(), k[:, :, low:high].transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores.masked_fill_(~causal_allowed(rows, high, window)[:, low:], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out.append(torch.matmul(probs, v[:, :, low:high]).to(q.dtype))
        if on_chunk is not None:
            on_chunk(probs, rows, low, n_keys)
    return torch.cat(out, dim=2)


def sdpa_with_triton_stats(module, query, key, value, attention_mask, scaling, window, sliding_window, readers, **kwargs):
    """Output from SDPA, statistics for `readers` (PatternStats) from the Triton kernels: no pattern is formed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from attnprobe.kernels import triton_stats

    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    n_queries, n_keys = query.shape[2], key.shape[2]
    fused = None
    if window is None or window >= n_keys:  # a fused kernel returns the row log-sum-exp beside the output
        fused = triton_stats.sdpa_with_lse(query, k, value, scaling)
    lse = None
    if fused is not None:
        out, lse = fused
        z = out.transpose(1, 2)
    else:
        z, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    argmax = None
    if any(r.track_argmax for r in readers):
        argmax = triton_stats.last_rows_argmax(query, k, scaling, [n_keys - 1], window)[..., 0]
    if n_queries == 1 and all(r.column_sum is not None for r in readers):  # a decode step: argmax only
        column_sum, entries = None, {}
    else:
        diagonals = sorted({off for r in readers for off in r.diagonals})
        column_sum, entries = triton_stats.pattern_statistics(query, k, scaling, window, lse, diagonals)
    for reader in readers:
        reader.update_from_stats(column_sum, entries, n_keys - n_queries, n_keys, argmax)
    return z


def kernels_replace_every_head(session, layer, n_heads) -> bool:
    """True when the layer's Z edits are all kernel replacements that together cover every head: the
    softmax output would be overwritten whole, so it need not be computed."""
    edits = session.edits.get((layer, Site.Z), ())
    return bool(edits) and all(e.kernel is not None for e in edits) and {h for e in edits for h in e.heads} == set(range(n_heads))


def fused_linear_heads(session, layer, query, key, value, scaling, window):
    """On CUDA, the prefill of a layer whose only Z edits replace some of its heads by linear kernels runs
    all its heads in one Triton launch (softmax heads over `window`, linear heads on their features) and
    leaves each edit the recurrent state its decode steps continue from. Returns z (B, T, H, d), or None
    when the layer does not qualify (decode step, other edits, every head replaced, fp16, a kernel
    Triton cannot run)."""
    from attnprobe.kernels.linear import LinearKernel

    edits = session.edits.get((layer, Site.Z), ())
    if (not edits or query.shape[2] != key.shape[2] or query.dtype == torch.float16
            or not all(isinstance(e.kernel, LinearKernel) and e.kernel.fits_triton(query, value.shape[-1]) for e in edits)):
        return None
    replaced = [head for e in edits for head in e.heads]
    if len(set(replaced)) != len(replaced) or len(replaced) == query.shape[1]:
        return None  # overlapping edits; or no softmax head left, which the chunked kernel alone serves best
    from attnprobe.kernels.triton_linear import LINEAR, SOFTMAX, hybrid_attention

    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    features = {}
    for edit in edits:
        phi_q, phi_k = edit.kernel.features(query[:, edit.heads], k[:, edit.heads], scaling)
        edit.state["kernel"] = edit.kernel.state_from(phi_k, v[:, edit.heads])
        edit.state["length"] = key.shape[2]
        features.update({head: (phi_q[:, i], phi_k[:, i]) for i, head in enumerate(edit.heads)})
    linear_heads = sorted(features)
    phi_q = torch.stack([features[h][0] for h in linear_heads], dim=1)
    phi_k = torch.stack([features[h][1] for h in linear_heads], dim=1)
    modes = [LINEAR if head in features else SOFTMAX for head in range(query.shape[1])]
    return hybrid_attention(query, k, v, phi_q, phi_k, modes, scaling, window).transpose(1, 2)


def attnprobe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        sliding_window=None, softcap=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    backend = getattr(module, "_attnprobe_backend", None)
    session = backend.session if backend is not None else None
    layer = module.layer_idx
    if session is None or layer not in session.attention_layers:
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, sliding_window=sliding_window, **kwargs)
    scaling = scaling if scaling is not None else module.head_dim ** -0.5
    window = sliding_window if sliding_window is not None else backend.info.window(layer)
    n_keys = key.shape[2]
    positions = torch.arange(n_keys - query.shape[2], n_keys, device=query.device)
    if session is not None:
        query, key, value, call = session.edit_qkv(layer, query, key, value, scaling, window, positions)
        pattern_readers = session.reads.get((layer, Site.PATTERN), ())
    else:
        call, pattern_readers = None, ()
    if pattern_readers or softcap is not None:
        replaced = [e for e in session.edits.get((layer, Site.Z), ()) if e.pattern_fn is not None] if session else []
        if (softcap is None and not replaced and use_triton(query)
                and all(type(reader) is PatternStats for reader in pattern_readers)):
            z = sdpa_with_triton_stats(module, query, key, value, attention_mask, scaling, window, sliding_window,
                                       pattern_readers, dropout=dropout, **kwargs)
            return session.apply(layer, Site.Z, z.contiguous(), call), None

        def on_chunk(probs, rows, low, n_keys):
            for edit in replaced:  # a replaced head shows its kernel's attention, not the softmax it lost
                probs[:, edit.heads] = edit.pattern_fn(call, rows)[..., low:low + probs.shape[-1]].to(probs)
            for reducer in pattern_readers:
                reducer.update(probs, rows, low, n_keys)

        z = chunked_softmax_attention(query, key, value, scaling, positions, window, softcap, on_chunk).transpose(1, 2)
    else:
        fused = None
        if session is not None and softcap is None and use_triton(query):
            fused = fused_linear_heads(session, layer, query, key, value, scaling, window)
        if fused is not None:  # the kernel edits are done: only the Z reads remain
            return session.apply(layer, Site.Z, fused.contiguous(), call, edits=False), None
        if session is not None and kernels_replace_every_head(session, layer, query.shape[1]):
            z = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])  # all overwritten
        else:
            z, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, sliding_window=sliding_window, **kwargs)
    if session is not None:
        z = session.apply(layer, Site.Z, z.contiguous(), call)
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

    def _pre_hook(self, layer):
        def hook(module, args, kwargs):
            if self.session is None:
                return None
            if args:
                return (self.session.apply(layer, Site.RESID_PRE, args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = self.session.apply(layer, Site.RESID_PRE, kwargs["hidden_states"])
            return args, kwargs
        return hook

    def _output_hook(self, layer, site):
        def hook(module, args, output):
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
