"""What every backend shares: the Backend interface, the per-run plan of reads and edits, chunked
softmax attention, decoder-layer lookup, residual writers and the replaced-head chunk callback.

    logits = backend.run(ids, reads={(layer, Site.PATTERN): PatternStats()}, edits=[zero_heads(3, 1)])
    with backend.patched(edits):      # edits stay on for generate / perplexity loops
        model.hf.generate(...)

Each backend is one module of this package importing only this one; `backends.BACKENDS` names them.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from attnprobe.kernels.attention_stats import allowed_keys as causal_allowed

from ..edits import AttentionCall, Edit
from attnprobe.errors import AttnprobeError
from ..model import Model, check_ids
from ..reducers import Reducer
from ..sites import Site

Reads = Mapping[tuple[int, Site], Reducer]

ATTENTION_SITES = (Site.Q, Site.K, Site.V, Site.PATTERN, Site.Z)
CHUNK_ELEMENTS = 1 << 25  # score elements per query chunk (128 MB in fp32)
MAX_CHUNK_ROWS = 256  # small enough chunks that causal skipping drops most of the upper triangle


class SiteNotFired(AttnprobeError):
    """A requested read never fired: the site does not exist on this model or was never reached."""


class Session:
    """The plan of one run: reducers and edits by (layer, site), and the layers whose attention they touch."""

    def __init__(self, reads, edits):
        self.reads = defaultdict(list)
        for (layer, site), reducer in reads.items():
            self.reads[(layer, site)].append(reducer)
        self.edits = defaultdict(list)
        for edit in edits:
            self.edits[(edit.layer, edit.site)].append(edit)
        self.attention_layers = {layer for (layer, site) in list(self.reads) + list(self.edits) if site in ATTENTION_SITES}

    def edit_qkv(self, layer, query, key, value, scaling, window, positions, key_offset: int = 0):
        """Apply Q/K/V edits and reads; return the (possibly edited) q, k, v and their AttentionCall."""
        call = AttentionCall(layer, query, key, value, scaling, window, positions, key_offset)
        query = self.apply(layer, Site.Q, query, call)
        key = self.apply(layer, Site.K, key, call)
        value = self.apply(layer, Site.V, value, call)
        return query, key, value, AttentionCall(layer, query, key, value, scaling, window, positions, key_offset)

    def apply(self, layer, site, tensor, call=None, edits: bool = True):
        for edit in self.edits.get((layer, site), ()) if edits else ():
            tensor = edit.fn(tensor, call)
        for reducer in self.reads.get((layer, site), ()):
            reducer.update(tensor)
        return tensor

    def replaced(self, layer) -> list[Edit]:
        """The layer's Z edits that put other attention in their heads' place (they show it to pattern reads)."""
        return [edit for edit in self.edits.get((layer, Site.Z), ()) if edit.pattern_fn is not None]

    def chunk_reader(self, layer, call):
        """The `on_chunk(probs, rows, low, n_keys)` callback of chunked attention: a replaced head shows its
        kernel's attention (its softmax output is overwritten at z), then the pattern reducers see the chunk."""
        replaced = self.replaced(layer)
        readers = self.reads.get((layer, Site.PATTERN), ())

        def on_chunk(probs, rows, low, n_keys):
            for edit in replaced:
                probs[:, edit.heads] = edit.pattern_fn(call, rows)[..., low:low + probs.shape[-1]].to(probs)
            for reducer in readers:
                reducer.update(probs, rows, low, n_keys)

        return on_chunk


def decoder_layers(hf: torch.nn.Module):
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model
    return decoder.layers


def residual_writers(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Modules whose outputs are what the block adds to the residual stream (attention, MLP)."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: sandwich norms after each sublayer
        return layer.post_attention_layernorm, layer.post_feedforward_layernorm
    return layer.self_attn, layer.mlp


def chunked_softmax_attention(q, k, v, scaling, query_positions, window=None, softcap=None, on_chunk=None):
    """Exact causal softmax attention in query chunks: z (B, H, T, d); `on_chunk(p, rows, low, n_keys)` sees each chunk."""
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


class Backend:
    name = "base"
    keeps_edits_for_generation = False  # whether `patched` works (plain HF generate under edits and reads)

    def __init__(self, model: Model) -> None:
        self.model = model
        self.info = model.info
        self.standing: list[Edit] = []

    @contextmanager
    def standing_edits(self, edits: Sequence[Edit]) -> Iterator[None]:
        """Apply `edits` in every run and patched block inside this context: a census of a modified model."""
        self.check({}, edits)
        previous, self.standing = self.standing, self.standing + list(edits)
        try:
            yield
        finally:
            self.standing = previous

    def check(self, reads: Reads, edits: Sequence[Edit]) -> None:
        n_layers = self.info.n_layers
        for layer, site in list(reads) + [(e.layer, e.site) for e in edits]:
            if not 0 <= layer < n_layers:
                raise AttnprobeError(f"layer {layer} is out of range: this model has layers 0-{n_layers - 1}")
            if not isinstance(site, Site):
                raise AttnprobeError(f"unknown site {site!r}: choose one of {', '.join(s.value for s in Site)}")

    def run(self, ids: torch.Tensor, reads: Reads | None = None, edits: Sequence[Edit] = ()) -> torch.Tensor:
        """Forward `ids` (B, T) with reads and edits; return logits (B, T, vocab) in fp32."""
        reads = dict(reads or {})
        self.check(reads, edits)
        ids = check_ids(self.info, ids).to(self.model.device)
        logits = self._run(ids, reads, self.standing + list(edits))
        silent = [f"({layer}, {site.value})" for (layer, site), r in reads.items() if not r.fired]
        if silent:
            raise SiteNotFired(f"reads never fired on the {self.name} backend: {', '.join(silent)}")
        return logits

    def _run(self, ids, reads, edits) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def patched(self, edits: Sequence[Edit], reads: Reads | None = None) -> Iterator[None]:
        """Keep edits (and reads) active on `model.hf` for a block of plain HF calls (generate, loss)."""
        raise AttnprobeError(f"the {self.name} backend cannot keep edits on for generation; use --backend native")
        yield  # pragma: no cover

    def close(self) -> None:
        """Give the HF module back as it was before this backend."""
