"""The census: run every registered probe stage on one model and write a run directory.

The stages and what they add to the heads table are declared by the probe modules themselves
(`mechanisms.stages()`); this module runs them in order and saves each the moment it finishes
(retrieval saves every NIAH sample), so a killed census rerun with the same command resumes where it
stopped and ends with the same tables.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from numbers import Integral
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model

from . import mechanisms, texts
from .perplexity import WINDOW
from .rundir import RunDir, read_json, readable, write_json, write_parquet


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
    prose_sequences: int = _option(4, "prose sequences for hidden/secondary sinks and massive activations")
    prose_length: int = _option(512, "tokens per prose sequence")
    hidden_threshold: float = _option(0.1, "alpha_k above which a non-initial token is a hidden sink")
    hidden_min_queries: int = _option(16, "queries that must see a key before it can be a hidden sink")
    massive_absolute: float = _option(100.0, "|activation| above which an entry can be massive")
    massive_relative: float = _option(1000.0, "times the layer's median |activation| a massive entry exceeds")
    perplexity_tokens: int = _option(2048, "held-out tokens for the massive-activation intervention's perplexity")
    perplexity_length: int = _option(WINDOW, "tokens per held-out row (BOS counted), as the matrix scores them")
    # head types
    induction_length: int = _option(50, "length of the repeated random string for induction heads")
    induction_batch: int = _option(10, "repeated random strings for induction heads")
    # retrieval heads
    lengths: list[int] = _option(lambda: [512, 1024, 2048], "NIAH context lengths in tokens")
    depths: list[float] = _option(lambda: [0.0, 0.25, 0.5, 0.75, 1.0], "needle depths (0-1)")
    needles: int = _option(2, "needles per (length, depth)")
    # role thresholds: role name -> threshold, defaults declared by each probe (mechanisms.py)
    thresholds: dict[str, float] = _option(lambda: mechanisms.default_thresholds(), "role thresholds", cli=False)

    def __post_init__(self) -> None:
        """Refuse impossible settings before anything is loaded or written."""
        if self.bos not in ("auto", "on", "off"):
            raise AttnprobeError(f"--bos must be auto, on or off, not '{self.bos}'")
        whole = ("seed", "sink_length", "sink_sequences", "prose_sequences", "prose_length", "hidden_min_queries",
                 "perplexity_tokens", "perplexity_length", "induction_length", "induction_batch", "needles")
        for name in whole:
            value = getattr(self, name)
            low = 0 if name == "seed" else 2 if name in ("sink_length", "prose_length", "perplexity_length", "induction_length") else 1
            if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
                raise AttnprobeError(f"--{name.replace('_', '-')} must be a whole number of at least {low}, got {value}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, Integral) or n < 16 for n in self.lengths):
            raise AttnprobeError(f"--lengths are NIAH context lengths, whole numbers of at least 16 tokens; got {self.lengths}")
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise AttnprobeError(f"--depths are fractions of the haystack between 0 and 1; got {self.depths}")
        from .retrieval import load_needles

        if self.needles > len(load_needles()):
            raise AttnprobeError(f"--needles {self.needles}: {len(load_needles())} needles are packaged; choose 1-{len(load_needles())}")
        if self.hidden_min_queries * self.hidden_threshold <= 1:
            raise AttnprobeError(f"--hidden-min-queries ({self.hidden_min_queries}) x --hidden-threshold ({self.hidden_threshold}) "
                                 "must exceed 1, or a previous-token head would make every late key a hidden sink")
        for path in (self.texts, self.haystack):
            if path is not None:
                texts.prose(path)  # a missing, empty, binary or non-UTF-8 file is refused now, not mid-census
        self.thresholds = {**mechanisms.default_thresholds(), **self.thresholds}
        unknown = sorted(set(self.thresholds) - set(mechanisms.default_thresholds()))
        if unknown:
            raise AttnprobeError(f"unknown role threshold(s) {', '.join(unknown)}: choose from {', '.join(mechanisms.default_thresholds())}")
        for name, value in self.thresholds.items():
            if not 0 <= value < 1:
                raise AttnprobeError(f"--{name.replace('_', '-')}-threshold must be at least 0 and below 1, got {value}")

    def check(self, model: Model) -> None:
        window = model.info.max_context
        too_long = [n for n in self.lengths + [self.prose_length, self.sink_length] if window and n + 64 > window]
        if too_long:
            raise AttnprobeError(f"context length {max(too_long)} does not fit the model's window of {window} tokens (keep lengths <= {window - 64})")
        if not 0 < self.thresholds["sink"] < 1:
            raise AttnprobeError(f"--sink-threshold (eps) must be between 0 and 1, got {self.thresholds['sink']}")


def resolve_bos(setting: str, model: Model) -> bool:
    """A run's one BOS convention (auto: the tokenizer's own), for every pass it makes: probes,
    teacher passes of a fit, mean-ablation means, recall and perplexity."""
    if setting == "auto":
        return model.info.tokenizer_adds_bos
    if setting not in ("on", "off"):
        raise AttnprobeError(f"--bos must be auto, on or off, not '{setting}'")
    if setting == "on" and model.info.bos_id is None:
        raise AttnprobeError("this tokenizer has no BOS token: use --bos off")
    return setting == "on"


def use_bos(config: CensusConfig, model: Model) -> bool:
    return resolve_bos(config.bos, model)


def token_strings(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    return [[tokenizer.decode([int(t)]) for t in row] for row in ids]


class Census:
    """One census run: the model, its backend, the settings and the run directory the stages write to.

    A stage (`mechanisms.Stage.run`) reads `census.model`, `.backend`, `.config`, `.run`, `.info`,
    `.bos`, `.progress`, and the shared inputs `natural(...)` and `prose_inputs`."""

    def __init__(self, model: Model, backend: Backend, config: CensusConfig, out: Path,
                 progress: Callable[[str, int, int], None] | None = None, note: Callable[[str], None] | None = None):
        config.check(model)
        self.model, self.backend, self.config = model, backend, config
        self.run = RunDir(out)
        self.info = model.info
        self.bos = use_bos(config, model)
        self.progress = progress or (lambda stage, done, total: None)
        self.notes: list[str] = []  # what the census did differently from its settings, and why
        self._say = note or (lambda message: None)
        torch.manual_seed(config.seed)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            self._say(message)

    # ---- inputs shared by stages ----------------------------------------------------------------
    def natural(self, n: int, length: int, bos: bool, seed_offset: int = 0, what: str = "sequences") -> torch.Tensor:
        """`n` windows of natural text of `length` tokens from the census range (fewer, with a note, when
        the text holds fewer); with BOS, length counts it (Gu et al.'s T)."""
        start, end = texts.token_range(self.model.tokenizer, "census", self.config.texts)
        if end - start + bos < length:  # a short text: one shorter sequence, said, rather than no stage at all
            if end - start < 16:
                raise AttnprobeError(f"{what}: the text's census range holds only {end - start} tokens: pass a longer --texts")
            self.note(f"{what}: the text holds no sequence of {length} tokens, so one of {end - start + bos} was used")
            length = end - start + bos
        ids = texts.natural_sequences(self.model.tokenizer, n, length, path=self.config.texts, seed=self.config.seed + seed_offset,
                                      bos_id=self.info.bos_id if bos else None, purpose=what, fewer_ok=True)
        if ids.shape[0] < n:
            self.note(f"{what}: the text holds {ids.shape[0]} sequences of {length} tokens, so {ids.shape[0]} were used, not {n}")
        return ids

    @cached_property
    def prose_inputs(self) -> tuple[torch.Tensor, list[list[str]]]:
        """(ids, token strings) of the prose prefills that hidden sinks, massive activations and secondary sinks share."""
        ids = self.natural(self.config.prose_sequences, self.config.prose_length, self.bos, seed_offset=1, what="prose")
        return ids, token_strings(self.model.tokenizer, ids)

    def per_head(self, scores: dict[str, torch.Tensor]) -> pd.DataFrame:
        rows = []
        for layer in range(self.info.n_layers):
            for head in range(self.info.n_heads):
                rows.append({"layer": layer, "head": head, **{k: float(v[layer, head]) for k, v in scores.items()}})
        return pd.DataFrame(rows)

    # ---- driver -------------------------------------------------------------------------------
    def _check_resume(self) -> None:
        """Refuse a directory whose finished work was made with other settings; unfinished work never blocks."""
        config_path = self.run.shard("config.json")
        wanted = {"model": self.info.model_id, "weights_sha256": self.info.weights_sha256, "backend": self.backend.name,
                  **asdict(self.config)}
        finished = self.run.shards.is_dir() and (any(self.run.shards.glob("*.done")) or any(self.run.shards.glob("niah/*.json")))
        if config_path.exists() and finished:
            try:
                previous = read_json(config_path)
            except ValueError:
                raise AttnprobeError(f"{config_path} is damaged, so the settings of the finished stages are unknown: "
                                     f"delete {self.run.shards} to start over, or use a new --out") from None
            if previous != wanted:
                changed = sorted(k for k in wanted if previous.get(k) != wanted[k])
                raise AttnprobeError(f"{self.run.root} holds a census with other settings ({', '.join(changed)}): use a new --out")
        write_json(config_path, wanted)

    def _intact(self, stage: mechanisms.Stage) -> bool:
        """Whether every file a finished stage wrote still reads back whole."""
        paths = [self.run.shard(stage.shard)] if stage.shard else []
        return all(readable(path) for path in paths + [self.run / name for name in stage.files])

    def plan(self, stages: tuple[str, ...] | None = None) -> list[mechanisms.Stage]:
        """The stages to run, in order (a stage whose inputs a skipped, unfinished stage makes is refused)."""
        return mechanisms.plan(stages, lambda name: self.run.done(f"{name}.done"))

    def execute(self, stages: tuple[str, ...] | None = None) -> pd.DataFrame:
        order = self.plan(stages)
        with self.run.lock():
            self._check_resume()
            start = time.time()
            for stage in order:
                marker = self.run.shard(f"{stage.name}.done")
                self.progress(stage.name, 0, 1)
                if marker.exists() and not self._intact(stage):
                    self.note(f"{stage.name}: a file it saved is damaged, so it runs again")
                    marker.unlink()
                if not marker.exists():
                    with texts.recording() as used:
                        stage.run(self)
                    write_json(self.run.shard(f"{stage.name}.texts.json"), texts.summarise(used))
                    write_json(marker, {"finished": time.time()})
                self.progress(stage.name, 1, 1)
            heads = self.heads_table()
            write_parquet(self.run / "heads.parquet", heads)
            self.write_manifest(time.time() - start)
        return heads

    def heads_table(self) -> pd.DataFrame:
        info = self.info
        heads = self.per_head({})
        heads["kv_head"] = heads["head"].map(info.kv_head)
        heads["layer_type"] = heads["layer"].map(lambda l: info.layer_types[l])
        for stage in mechanisms.stages():
            path = self.run.shard(stage.shard) if stage.shard else None
            if path is not None and path.exists():
                heads = heads.merge(pd.read_parquet(path)[["layer", "head", *stage.columns]], on=["layer", "head"], how="left")
        heads["roles"] = heads.apply(lambda row: ",".join(mechanisms.head_roles(row, self.config.thresholds)), axis=1)
        return heads

    def write_manifest(self, wall_time: float) -> None:
        import importlib.metadata as metadata

        versions = {}
        for package in ("attnprobe", "torch", "transformers", "transformer-lens", "nnsight", "pandas"):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = None
        previous = self.run / "manifest.json"
        earlier = read_json(previous).get("wall_time_s", 0.0) if readable(previous) else 0.0
        used = [record for stage in mechanisms.stages() if readable(self.run.shard(f"{stage.name}.texts.json"))
                for record in read_json(self.run.shard(f"{stage.name}.texts.json"))]
        write_json(self.run / "manifest.json", {
            "model_id": self.info.model_id, "weights_sha256": self.info.weights_sha256, "backend": self.backend.name,
            "dtype": str(next(self.model.hf.parameters()).dtype).replace("torch.", ""), "bos": self.bos,
            "seed": self.config.seed, "lengths": self.config.lengths, "config": asdict(self.config),
            "versions": versions, "wall_time_s": earlier + wall_time, "info": self.info.to_dict(), "notes": self.notes,
            "texts": texts.summarise(used),
        })
