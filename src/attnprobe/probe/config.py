"""The census's settings (`CensusConfig`), importable without torch: `attnprobe census --help` and the range
checks answer before anything heavy is imported, loaded or written."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from numbers import Integral
from typing import TYPE_CHECKING

from attnprobe.errors import AttnprobeError

from . import declared

if TYPE_CHECKING:
    from attnprobe.hooks.model import Model

NEEDLES = "data/needles.json"  # the packaged needle/question/answer triples (retrieval.load_needles)
WINDOW = 512  # tokens per scored perplexity row (BOS counted); one length, so census and matrix agree


def _option(default, help: str, **extra):
    """A setting with the help text the command line shows for it (`attnprobe census --help`)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class CensusConfig:
    """Every setting of a census; the CLI's census options are built from these fields."""

    bos: str = _option("auto", "prepend BOS: auto (the tokenizer's convention) | on | off")
    seed: int = _option(0, "seed of the random inputs")
    texts: str | None = _option(None, "UTF-8 text file for sinks, massive activations, perplexity (default: pydoc prose)")
    haystack: str | None = _option(None, "UTF-8 haystack text file for NIAH (default: pydoc prose)")
    # primary sinks: the reference protocol
    sink_length: int = _option(64, "tokens per sink-rate sequence (T of the reference protocol)")
    sink_sequences: int = _option(100, "sequences for the sink rate (fewer when a short --texts has no more)")
    # hidden / secondary sinks and massive activations: prose prefills
    prose_sequences: int = _option(4, "prose sequences for hidden and secondary sinks")
    prose_length: int = _option(512, "tokens per prose sequence")
    hidden_threshold: float = _option(0.1, "alpha_k above which a non-initial token is a hidden sink")
    hidden_min_queries: int = _option(16, "queries that must see a key before it can be a hidden sink")
    massive_sequences: int = _option(64, "census-text sequences scanned for massive activations (a rare dim needs many)")
    massive_length: int = _option(128, "tokens per massive-activation sequence (BOS counted)")
    massive_absolute: float = _option(100.0, "|activation| above which an entry can be massive")
    massive_relative: float = _option(1000.0, "times the layer's median |activation| a massive entry exceeds")
    perplexity_tokens: int = _option(2048, "held-out tokens for the massive-activation intervention's perplexity")
    perplexity_length: int = _option(WINDOW, "tokens per held-out row (BOS counted), as the matrix scores them")
    # head types
    induction_length: int = _option(50, "length of the repeated random string for induction heads")
    induction_batch: int = _option(10, "repeated random strings for induction heads")
    induction_periods: list[int] = _option(lambda: [50, 128, 256, 512, 1024],
                                           "periods of the repeated random strings whose in-context loss drop is measured")
    induction_loss_batch: int = _option(2, "repeated random strings per period for the in-context loss drop (each 2 x period tokens)")
    # retrieval heads
    lengths: list[int] = _option(lambda: [512, 1024, 2048], "NIAH context lengths in tokens")
    depths: list[float] = _option(lambda: [0.0, 0.25, 0.5, 0.75, 1.0], "needle depths (0-1)")
    needles: int = _option(2, "needles per (length, depth)")
    needle_patch_samples: int = _option(2, "NIAH samples (first length, census depths in turn) for needle patching")
    per_head_patching: bool = _option(False, "also measure each head's share of the induction loss drop and its needle-patching "
                                             "drop: one pass per head and sample (270 per sample on SmolLM2, minutes on a CPU)")
    # role thresholds: role name -> threshold, defaults declared by each probe (the CLI gives one --ROLE-threshold each)
    thresholds: dict[str, float] = _option(declared.default_thresholds, "role thresholds", cli=False)

    def __post_init__(self) -> None:
        """Refuse impossible settings before anything is loaded or written (the numbers first: they need no torch)."""
        if self.bos not in ("auto", "on", "off"):
            raise AttnprobeError(f"--bos must be auto, on or off, not '{self.bos}'")
        whole = ("seed", "sink_length", "sink_sequences", "prose_sequences", "prose_length", "hidden_min_queries",
                 "perplexity_tokens", "perplexity_length", "induction_length", "induction_batch", "induction_loss_batch", "needles",
                 "needle_patch_samples", "massive_sequences", "massive_length")
        for name in whole:
            value = getattr(self, name)
            low = 0 if name == "seed" else 2 if name in ("sink_length", "prose_length", "perplexity_length", "induction_length",
                                                         "massive_length") else 1
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise AttnprobeError(f"--{name.replace('_', '-')} must be a whole number of at least {low}, got {value}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, Integral) or n < 16 for n in self.lengths):
            raise AttnprobeError(f"--lengths are NIAH context lengths, whole numbers of at least 16 tokens; got {self.lengths}")
        if not self.induction_periods or any(isinstance(p, bool) or not isinstance(p, Integral) or p < 2 for p in self.induction_periods):
            raise AttnprobeError(f"--induction-periods are string lengths, whole numbers of at least 2; got {self.induction_periods}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise AttnprobeError(f"--depths are fractions of the haystack between 0 and 1; got {self.depths}")
        if not (self.massive_absolute > 0 and self.massive_relative > 0):
            raise AttnprobeError(f"--massive-absolute and --massive-relative must be above 0, got {self.massive_absolute} and "
                                 f"{self.massive_relative}")
        if self.hidden_min_queries * self.hidden_threshold <= 1:
            raise AttnprobeError(f"--hidden-min-queries ({self.hidden_min_queries}) x --hidden-threshold ({self.hidden_threshold}) "
                                 "must exceed 1, or a previous-token head would make every late key a hidden sink")
        known = declared.default_thresholds()
        self.thresholds = {**known, **self.thresholds}
        unknown = sorted(set(self.thresholds) - set(known))
        if unknown:
            raise AttnprobeError(f"unknown role threshold(s) {', '.join(unknown)}: choose from {', '.join(known)}")
        for name, value in self.thresholds.items():
            if not 0 <= value < 1:
                raise AttnprobeError(f"--{name.replace('_', '-')}-threshold must be at least 0 and below 1, got {value}")
        self._check_files()

    def _check_files(self) -> None:
        packaged = len(json.loads(resources.files(__package__).joinpath(NEEDLES).read_text()))
        if self.needles > packaged:
            raise AttnprobeError(f"--needles {self.needles}: {packaged} needles are packaged; choose 1-{packaged}")
        for path in (self.texts, self.haystack):
            if path is not None:
                from . import texts

                texts.prose(path)  # a missing, empty, binary or non-UTF-8 file is refused now, not mid-census

    def check(self, model: Model) -> None:
        window = model.info.max_context
        too_long = [n for n in self.lengths + [self.prose_length, self.sink_length, self.massive_length] if window and n + 64 > window]
        if too_long:
            raise AttnprobeError(f"context length {max(too_long)} does not fit the model's window of {window} tokens (keep lengths <= {window - 64})")
        if not 0 < self.thresholds["sink"] < 1:
            raise AttnprobeError(f"--sink-threshold (eps) must be between 0 and 1, got {self.thresholds['sink']}")
