"""One interface for running a model with reads (site -> reducer) and edits, whatever does the hooking.

    logits = backend.run(ids, reads={(layer, Site.PATTERN): PatternStats()}, edits=[zero_heads(3, 1)])
    with backend.patched(edits):      # edits stay on for generate / perplexity loops
        model.hf.generate(...)

Implementations: `native` (hooks transformers' own attention call; keeps SDPA where nothing is read),
`transformer-lens` (TransformerBridge) and `nnsight`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch

from .edits import Edit
from .errors import AttnprobeError
from .model import Model, check_ids
from .reducers import Reducer
from .sites import Site

Reads = Mapping[tuple[int, Site], Reducer]

BACKENDS = ("native", "transformer-lens", "nnsight")


class SiteNotFired(AttnprobeError):
    """A requested read never fired: the site does not exist on this model or was never reached."""


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


def make_backend(name: str, model: Model) -> Backend:
    if not isinstance(model, Model):
        raise AttnprobeError(f"make_backend needs a Model (from load_model), got {type(model).__name__}")
    if name == "native":
        from .native import NativeBackend

        return NativeBackend(model)
    if name in ("transformer-lens", "tl"):
        from .tl_backend import TransformerLensBackend

        return TransformerLensBackend(model)
    if name == "nnsight":
        from .nnsight_backend import NnsightBackend

        return NnsightBackend(model)
    raise AttnprobeError(f"unknown backend '{name}': choose one of {', '.join(BACKENDS)}")
