"""The census: run every registered probe stage on one model and write a run directory.

The stages and what they add to the heads table are declared by the probe modules themselves
(`mechanisms.stages()`); this module runs them in order and saves each the moment it finishes
(retrieval saves every NIAH sample), so a killed census rerun with the same command resumes where it
stopped and ends with the same tables.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from attnprobe.hooks.backends import Backend
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model
from attnprobe.hooks.swap import pattern_normalisation

from . import mechanisms, texts
from .config import CensusConfig
from .rundir import RunDir, read_json, readable, write_json, write_parquet


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
        """(ids, token strings) of the prose prefills that hidden and secondary sinks share."""
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

    def replaced_pattern_rules(self) -> dict[tuple[int, int], str]:
        """(layer, head) -> how attention-based scores read a replaced head's effective attention (hooks.swap.pattern_rows):
        a delta-rule head's signed rows are divided by their absolute sum before any threshold applies."""
        return {(edit.layer, head): pattern_normalisation(edit.kernel) for edit in self.backend.standing
                if edit.kernel is not None for head in edit.heads}

    def heads_table(self) -> pd.DataFrame:
        info = self.info
        heads = self.per_head({})
        heads["kv_head"] = heads["head"].map(info.kv_head)
        heads["layer_type"] = heads["layer"].map(lambda l: info.layer_types[l])
        replaced = self.replaced_pattern_rules()
        heads["pattern_normalisation"] = [replaced.get((r.layer, r.head), pattern_normalisation(None)) for r in heads.itertuples()]
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
