"""The nnsight backend: wraps the HF module with nnsight and intervenes inside a trace.

Attention sites are read at transformers' attention call (`attention_interface(self, q, k, v, mask,
...)` in the attention module's source): q, k, v there are after RoPE. A layer whose pattern is read
skips that call and computes attention in query chunks, exactly like the native backend's chunked path, so other
layers keep SDPA. z is the input of `o_proj`, reshaped to (B, T, H, d). nnsight hands values over in
forward order, so the trace visits layers in order and, within a layer, sites in the order they run.

Wrapping installs nnsight's forward controllers on the HF modules (an instance `forward` and a state
entry in each module's `__dict__`); they are inert outside a trace, and `close()` removes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from nnsight import NNsight
from nnsight.intervention.interleaver import OutOfOrderError
from nnsight.intervention.source import STATE

from attnprobe.errors import AttnprobeError
from ..sites import Site
from .base import Backend, Session, SiteNotFired, chunked_softmax_attention, decoder_layers, residual_writers


@dataclass
class LayerEnvoys:
    block: object
    attention: object
    o_proj: object
    attn_writer: object
    mlp_writer: object


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, tensor):
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


class NnsightBackend(Backend):
    name = "nnsight"

    def __init__(self, model):
        super().__init__(model)
        self._own_forwards = {module: module.__dict__.get("forward") for module in model.hf.modules()}
        self.wrapped = NNsight(model.hf)
        path = {module: name for name, module in model.hf.named_modules()}
        envoy = lambda module: self.wrapped.get(path[module]) if path[module] else self.wrapped  # noqa: E731
        self.layers = []
        for layer in decoder_layers(model.hf):
            attn_writer, mlp_writer = residual_writers(layer)
            self.layers.append(LayerEnvoys(envoy(layer), envoy(layer.self_attn), envoy(layer.self_attn.o_proj),
                                           envoy(attn_writer), envoy(mlp_writer)))
        self._call_name = None

    def _attention_call(self, layer: int):
        """The `attention_interface(...)` call in the attention forward (the last op of that name)."""
        source = self.layers[layer].attention.source
        if self._call_name is None:
            names = [name for name in source.names if name.startswith("attention_interface_")]
            if not names:
                raise AttnprobeError(f"{type(self.model.hf).__name__} has no attention_interface call for nnsight to hook; use --backend native")
            self._call_name = names[-1]
        return getattr(source, self._call_name)

    def _run(self, ids, reads, edits):
        if any(edit.site == Site.PATTERN for edit in edits):
            raise AttnprobeError("the nnsight backend reads the pattern in chunks and cannot edit it; use --backend transformer-lens")
        session = Session(reads, edits)
        layers = sorted({layer for layer, _ in list(session.reads) + list(session.edits)})
        calls = {layer: self._attention_call(layer) for layer in session.attention_layers}
        try:
            with torch.no_grad(), self.wrapped.trace(ids, use_cache=False):
                for layer in layers:
                    self._intervene(layer, session, calls.get(layer))
                logits = self.wrapped.output.logits.save()
        except OutOfOrderError as exc:  # sites are visited in forward order, so the model never ran this one
            raise SiteNotFired(f"a site never fired on the nnsight backend: {exc}") from None
        return logits.float()

    def _intervene(self, layer, session, attention_call):
        """Visit one layer's sites in forward order: block input, attention call, o_proj input, outputs."""
        envoys = self.layers[layer]
        wanted = {site for (at, site) in list(session.reads) + list(session.edits) if at == layer}
        edited = {site for (at, site) in session.edits if at == layer}
        if Site.RESID_PRE in wanted:
            new = session.apply(layer, Site.RESID_PRE, envoys.block.input)
            if Site.RESID_PRE in edited:
                envoys.block.input = new
        call = self._attention(layer, session, attention_call, edited) if attention_call is not None else None
        if Site.Z in wanted:
            flat = envoys.o_proj.input
            heads = flat.view(*flat.shape[:2], self.info.n_heads, -1)
            new = session.apply(layer, Site.Z, heads, call)
            if Site.Z in edited:
                envoys.o_proj.input = new.reshape(flat.shape)
        for site, envoy in ((Site.ATTN_OUT, envoys.attn_writer), (Site.MLP_OUT, envoys.mlp_writer),
                            (Site.RESID_POST, envoys.block)):
            if site in wanted:
                output = envoy.output
                new = session.apply(layer, site, _first(output))
                if site in edited:
                    envoy.output = _replace_first(output, new)

    def _attention(self, layer, session, attention_call, edited):
        """Q/K/V/PATTERN at the attention call; returns the AttentionCall that Z edits see."""
        args, kwargs = attention_call.inputs
        module, query, key, value = args[:4]
        scaling = kwargs.get("scaling") or module.head_dim ** -0.5
        window = kwargs.get("sliding_window") or self.info.window(layer)
        n_keys = key.shape[2]
        positions = torch.arange(n_keys - query.shape[2], n_keys, device=query.device)
        query, key, value, call = session.edit_qkv(layer, query, key, value, scaling, window, positions)
        pattern_readers = session.reads.get((layer, Site.PATTERN), ())
        if pattern_readers:
            z = chunked_softmax_attention(query, key, value, scaling, positions, window, kwargs.get("softcap"),
                                          session.chunk_reader(layer, call))
            attention_call.skip((z.transpose(1, 2).contiguous(), None))
        elif edited & {Site.Q, Site.K, Site.V}:
            attention_call.inputs = ((module, query, key, value, *args[4:]), kwargs)
        return call

    def close(self) -> None:
        """Take nnsight's controllers off the HF modules, putting back any forward a module had of its own."""
        for module, forward in self._own_forwards.items():
            module.__dict__.pop(STATE, None)
            module.__dict__.pop("forward", None)
            if forward is not None:
                module.__dict__["forward"] = forward
