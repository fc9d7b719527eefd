"""The TransformerLens backend: a TransformerBridge (TransformerLens 4.x) around the loaded HF module.

The bridge recomputes attention itself (eager: scores, softmax, pattern), so every site has a hook
and the whole pattern is handed to reducers as one chunk. Building a bridge changes the HF module in
place: its submodules are swapped for bridge components, a zero `lm_head.bias` buffer appears, and
its configs are set to eager attention (as `boot_transformers` does: bridges that delegate to the HF
attention only see a pattern under eager). `close()` undoes all three.

TransformerLens fires `hook_v`, then `hook_rot_q`, then `hook_rot_k`. Q/K/V edits need the whole
call, so q and v are cloned when they pass and edited in place once k arrives; the bridge has not
used them yet at that point, and reads of q, k, v all happen then, after the edits.
"""
from __future__ import annotations

import copy

import torch

from ..edits import AttentionCall
from attnprobe.errors import AttnprobeError
from ..sites import TL_NAMES, Site
from .base import ATTENTION_SITES, Backend, Session, decoder_layers

# What the bridge rewires on the HF modules (it swaps submodules and adds e.g. a zero `lm_head.bias` buffer).
TREE_SLOTS = ("_modules", "_parameters", "_buffers")


def _attention_configs(hf: torch.nn.Module) -> list:
    configs = {id(module.config): module.config for module in hf.modules()
               if hasattr(getattr(module, "config", None), "_attn_implementation")}
    return list(configs.values())


class TransformerLensBackend(Backend):
    name = "transformer-lens"

    def __init__(self, model):
        super().__init__(model)
        from transformer_lens.model_bridge.sources import build_bridge_from_module

        hf = model.hf
        self._attention_modules = [layer.self_attn for layer in decoder_layers(hf)]
        self._tree = {module: [dict(getattr(module, slot)) for slot in TREE_SLOTS] for module in hf.modules()}
        self._implementations = [(config, config._attn_implementation) for config in _attention_configs(hf)]
        for config, _ in self._implementations:
            config._attn_implementation = "eager"
        # build_bridge_from_module rather than boot_transformers: the latter loads a tokenizer from the
        # hub when it is not handed a transformers one, and the bridge needs none for token ids.
        try:
            self.bridge = build_bridge_from_module(hf, type(hf).__name__, hf_config=copy.deepcopy(hf.config))
        except (ValueError, NotImplementedError) as exc:
            self.close()
            raise AttnprobeError(f"TransformerLens has no bridge for {type(hf).__name__} ({exc}); use --backend native") from None

    def _run(self, ids, reads, edits):
        session = Session(reads, edits)
        hooks = []
        for layer, site in sorted(set(session.reads) | set(session.edits)):
            if site not in ATTENTION_SITES:
                hooks.append((TL_NAMES[site].format(l=layer), self._plain_hook(session, layer, site)))
        for layer in sorted(session.attention_layers):
            hooks += self._attention_hooks(session, layer)
        with torch.no_grad():
            logits = self.bridge.run_with_hooks(ids, fwd_hooks=hooks)
        return logits.float()

    @staticmethod
    def _plain_hook(session, layer, site):
        return lambda tensor, hook: session.apply(layer, site, tensor)

    def _attention_hooks(self, session, layer):
        """Hooks of one layer's attention, sharing what they saw within one forward in `seen`.

        TransformerLens hands q, k, v and z to hooks as (B, T, heads, d); sites want q, k, v as
        (B, heads, T, d), which is a transposed view of the same memory."""
        scaling = self._attention_modules[layer].scaling
        window = self.info.window(layer)
        seen = {}

        def keep_v(v, hook):
            seen["v"] = v.clone()
            return seen["v"]

        def keep_q(q, hook):
            seen["q"] = q.clone()
            return seen["q"]

        def settle(k, hook):
            q, k, v = seen["q"].transpose(1, 2), k.transpose(1, 2), seen["v"].transpose(1, 2)
            positions = torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=q.device)
            call = AttentionCall(layer, q, k, v, scaling, window, positions)
            new_q = session.apply(layer, Site.Q, q, call)
            new_k = session.apply(layer, Site.K, k, call)
            new_v = session.apply(layer, Site.V, v, call)
            q.copy_(new_q)  # views of the clones handed back above: the bridge reads them after this hook
            v.copy_(new_v)
            seen["call"] = AttentionCall(layer, q, new_k, v, scaling, window, positions)
            return new_k.transpose(1, 2)

        replaced = session.replaced(layer)

        def pattern(probs, hook):
            call = seen["call"]
            if replaced:  # a replaced head shows its kernel's attention; its softmax output is overwritten at z
                probs = probs.clone()
                for edit in replaced:
                    probs[:, edit.heads] = edit.pattern_fn(call, call.query_positions).to(probs)
            return session.apply(layer, Site.PATTERN, probs, call)

        def z(heads, hook):
            return session.apply(layer, Site.Z, heads, seen["call"])

        name = lambda site: TL_NAMES[site].format(l=layer)  # noqa: E731
        hooks = [(name(Site.V), keep_v), (name(Site.Q), keep_q), (name(Site.K), settle)]
        sites = {site for (at, site) in list(session.reads) + list(session.edits) if at == layer}
        if Site.PATTERN in sites:
            hooks.append((name(Site.PATTERN), pattern))
        if Site.Z in sites:
            hooks.append((name(Site.Z), z))
        return hooks

    def close(self) -> None:
        """Give the HF module back its own submodules and attention implementation."""
        bridge = getattr(self, "bridge", None)
        if bridge is not None:
            bridge.reset_hooks(including_permanent=True)
        for module, saved in self._tree.items():
            for slot, entries in zip(TREE_SLOTS, saved):
                getattr(module, slot).clear()
                getattr(module, slot).update(entries)
        for config, implementation in self._implementations:
            config._attn_implementation = implementation
