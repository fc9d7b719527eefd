"""The census: run every probe on one model and write a run directory.

Stages run in order and each is saved the moment it finishes (retrieval saves every NIAH sample), so
a killed census rerun with the same command resumes where it stopped and ends with the same tables.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from attnprobe.hooks.backend import Backend
from attnprobe.hooks.errors import AttnprobeError
from attnprobe.hooks.model import Model

from . import texts
from .head_types import induction_scores, repeated_random_tokens
from .massive import massive_intervention, massive_scan
from .rundir import RunDir, read_json, write_json, write_jsonl, write_parquet
from .secondary import secondary_sinks
from .sinks import hidden_sink_summary, hidden_sinks, sink_rate, sink_scan, with_bos


@dataclass
class CensusConfig:
    bos: str = "auto"  # auto (the tokenizer's convention) | on | off
    seed: int = 0
    texts: str | None = None  # natural text for the sink rate, hidden sinks, massive activations, perplexity
    haystack: str | None = None
    # primary sinks: the reference protocol
    sink_length: int = 64
    sink_sequences: int = 100
    sink_eps: float = 0.3
    # hidden / secondary sinks and massive activations: prose prefills
    prose_sequences: int = 4
    prose_length: int = 512
    hidden_threshold: float = 0.1
    hidden_min_queries: int = 16
    massive_absolute: float = 100.0
    massive_relative: float = 1000.0
    perplexity_windows: int = 8
    perplexity_length: int = 256
    # head types
    induction_length: int = 50
    induction_batch: int = 10
    # retrieval heads
    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needles: int = 2
    # role thresholds
    retrieval_threshold: float = 0.1
    previous_threshold: float = 0.4
    induction_threshold: float = 0.4
    duplicate_threshold: float = 0.4

    def check(self, model: Model) -> None:
        window = model.info.max_context
        too_long = [n for n in self.lengths + [self.prose_length, self.sink_length] if window and n + 64 > window]
        if too_long:
            raise AttnprobeError(f"context length {max(too_long)} does not fit the model's window of {window} tokens (keep lengths <= {window - 64})")
        if not 0 < self.sink_eps < 1:
            raise AttnprobeError(f"--sink-eps must be between 0 and 1, got {self.sink_eps}")


def use_bos(config: CensusConfig, model: Model) -> bool:
    if config.bos == "auto":
        return model.info.tokenizer_adds_bos
    if config.bos not in ("on", "off"):
        raise AttnprobeError(f"--bos must be auto, on or off, not '{config.bos}'")
    if config.bos == "on" and model.info.bos_id is None:
        raise AttnprobeError("this tokenizer has no BOS token: use --bos off")
    return config.bos == "on"


def token_strings(tokenizer, ids: torch.Tensor) -> list[list[str]]:
    return [[tokenizer.decode([int(t)]) for t in row] for row in ids]


def _strip_bos(ids: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is not None and ids.shape[1] and bool((ids[:, 0] == bos_id).all()):
        return ids[:, 1:]
    return ids


class Census:
    def __init__(self, model: Model, backend: Backend, config: CensusConfig, out: Path,
                 progress: Callable[[str, int, int], None] | None = None):
        config.check(model)
        self.model, self.backend, self.config = model, backend, config
        self.run = RunDir(out)
        self.info = model.info
        self.bos = use_bos(config, model)
        self.progress = progress or (lambda stage, done, total: None)
        torch.manual_seed(config.seed)

    # ---- inputs -------------------------------------------------------------------------------
    def _natural(self, n: int, length: int, bos: bool, seed_offset: int = 0) -> torch.Tensor:
        ids = texts.natural_sequences(self.model.tokenizer, n, length, path=self.config.texts, seed=self.config.seed + seed_offset)
        ids = _strip_bos(ids, self.info.bos_id)
        return with_bos(ids, self.info.bos_id) if bos else ids

    # ---- stages -------------------------------------------------------------------------------
    def stage_sinks(self) -> None:
        c = self.config
        rates, first = {}, {}
        for label, bos in (("with_bos", True), ("without_bos", False)):
            if bos and self.info.bos_id is None:
                continue
            ids = self._natural(c.sink_sequences, c.sink_length, bos)
            alpha, previous = sink_scan(self.backend, ids)
            rates[label] = sink_rate(alpha[:, :, 0], c.sink_eps)
            first[label] = (alpha[:, :, 0], previous)
        chosen = "with_bos" if self.bos else "without_bos"
        alpha_first, previous = first[chosen]
        table = self._per_head({"alpha_1": alpha_first, "prev_token_score": previous})
        write_json(self.run / "sink_rate.json", {"T": c.sink_length, "eps": c.sink_eps, "n_sequences": c.sink_sequences,
                                                 "bos_used_for_heads": self.bos, **rates})
        write_parquet(self.run.shard("sinks.parquet"), table)

    def stage_induction(self) -> None:
        c = self.config
        ids = repeated_random_tokens(self.model.hf.config.vocab_size, c.induction_length, c.induction_batch, c.seed,
                                     self.info.bos_id if self.bos else None)
        induction, duplicate = induction_scores(self.backend, ids, c.induction_length)
        write_parquet(self.run.shard("induction.parquet"), self._per_head({"induction_score": induction, "duplicate_score": duplicate}))

    def stage_prose(self) -> None:
        c = self.config
        ids = self._natural(c.prose_sequences, c.prose_length, self.bos, seed_offset=1)
        tokens = token_strings(self.model.tokenizer, ids)
        first = 0
        events = []
        for sequence in range(ids.shape[0]):
            alpha, _ = sink_scan(self.backend, ids[sequence:sequence + 1])
            found = hidden_sinks(alpha, tokens[sequence], c.hidden_threshold, first, c.hidden_min_queries)
            events.append(found.assign(sequence=sequence))
        events = pd.concat(events, ignore_index=True)
        summary = hidden_sink_summary(events, self.info.n_layers, self.info.n_heads)
        summary["hidden_sink_count"] = summary["hidden_sink_count"] / ids.shape[0]  # per sequence
        write_parquet(self.run / "sinks.parquet", events)
        write_parquet(self.run.shard("hidden.parquet"), summary)
        layers, entries = massive_scan(self.backend, ids, tokens, c.massive_absolute, c.massive_relative)
        write_parquet(self.run / "massive_layers.parquet", layers)
        write_parquet(self.run / "massive.parquet", entries)
        secondary, windows = secondary_sinks(self.backend, ids, tokens)
        write_parquet(self.run / "secondary_sinks.parquet", secondary)
        write_parquet(self.run.shard("prose.parquet"), windows)

    def stage_massive_intervention(self) -> None:
        c = self.config
        entries = pd.read_parquet(self.run / "massive.parquet")
        held = texts.held_out_ids(self.model.tokenizer, c.perplexity_windows * c.perplexity_length, path=c.texts)
        windows = torch.as_tensor(held[: c.perplexity_windows * c.perplexity_length]).view(c.perplexity_windows, c.perplexity_length)
        if self.bos:
            windows = with_bos(windows, self.info.bos_id)
        table = massive_intervention(self.backend, entries, windows)
        write_parquet(self.run.shard("massive_intervention.parquet"), table)
        write_parquet(self.run / "massive_intervention.parquet", table)

    def stage_retrieval(self) -> None:
        from .retrieval import retrieval_census, retrieval_heads_json

        c = self.config
        sample_dir = self.run.shard("niah")
        done = {p.stem: read_json(p) for p in sample_dir.glob("*.json")} if sample_dir.exists() else {}
        total = len(c.lengths) * len(c.depths) * c.needles

        def on_sample(sample: dict) -> None:
            write_json(sample_dir / f"{sample['key']}.json", sample)
            self.progress("retrieval", len(list(sample_dir.glob("*.json"))), total)

        heads, samples = retrieval_census(self.model, self.backend, lengths=c.lengths, depths=c.depths, needles=c.needles,
                                          haystack=c.haystack, bos=self.bos, on_sample=on_sample, done=done)
        write_jsonl(self.run / "niah_samples.jsonl", samples)
        write_json(self.run / "retrieval_heads.json", retrieval_heads_json(samples, self.info.n_layers, self.info.n_heads))
        write_parquet(self.run.shard("retrieval.parquet"), heads)

    STAGES = ("sinks", "induction", "prose", "massive_intervention", "retrieval")

    # ---- driver -------------------------------------------------------------------------------
    def _per_head(self, scores: dict[str, torch.Tensor]) -> pd.DataFrame:
        rows = []
        for layer in range(self.info.n_layers):
            for head in range(self.info.n_heads):
                rows.append({"layer": layer, "head": head, **{k: float(v[layer, head]) for k, v in scores.items()}})
        return pd.DataFrame(rows)

    def _check_resume(self) -> None:
        config_path = self.run.shard("config.json")
        wanted = {"model": self.info.model_id, "weights_sha256": self.info.weights_sha256, "backend": self.backend.name,
                  **asdict(self.config)}
        if config_path.exists():
            previous = read_json(config_path)
            if previous != wanted:
                changed = sorted(k for k in wanted if previous.get(k) != wanted[k])
                raise AttnprobeError(f"{self.run.root} holds a census with other settings ({', '.join(changed)}): use a new --out")
        else:
            write_json(config_path, wanted)

    def execute(self, stages: tuple[str, ...] | None = None) -> pd.DataFrame:
        self._check_resume()
        start = time.time()
        order = [s for s in self.STAGES if stages is None or s in stages]
        for index, stage in enumerate(order):
            marker = self.run.shard(f"{stage}.done")
            self.progress(stage, 0, 1)
            if not marker.exists():
                getattr(self, f"stage_{stage}")()
                write_json(marker, {"finished": time.time()})
            self.progress(stage, 1, 1)
        heads = self.heads_table()
        write_parquet(self.run / "heads.parquet", heads)
        self.write_manifest(time.time() - start)
        return heads

    def heads_table(self) -> pd.DataFrame:
        info, c = self.info, self.config
        heads = self._per_head({})
        heads["kv_head"] = heads["head"].map(info.kv_head)
        heads["layer_type"] = heads["layer"].map(lambda l: info.layer_types[l])
        for shard in ("sinks", "induction", "hidden", "retrieval"):
            path = self.run.shard(f"{shard}.parquet")
            if path.exists():
                scores = pd.read_parquet(path)
                fresh = ["layer", "head"] + [c for c in scores.columns if c not in heads.columns]
                heads = heads.merge(scores[fresh], on=["layer", "head"], how="left")
        heads["roles"] = heads.apply(lambda row: ",".join(self._roles(row)), axis=1)
        return heads

    def _roles(self, row) -> list[str]:
        c = self.config
        checks = [("retrieval", "retrieval_score", c.retrieval_threshold), ("sink", "alpha_1", c.sink_eps),
                  ("previous_token", "prev_token_score", c.previous_threshold),
                  ("induction", "induction_score", c.induction_threshold),
                  ("duplicate", "duplicate_score", c.duplicate_threshold)]
        roles = [name for name, column, threshold in checks if column in row and pd.notna(row[column]) and row[column] > threshold]
        if "hidden_sink_count" in row and pd.notna(row["hidden_sink_count"]) and row["hidden_sink_count"] > 0:
            roles.insert(2, "hidden_sink")
        return roles

    def write_manifest(self, wall_time: float) -> None:
        import importlib.metadata as metadata

        versions = {}
        for package in ("attnprobe", "torch", "transformers", "transformer-lens", "nnsight", "pandas"):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = None
        previous = self.run / "manifest.json"
        earlier = read_json(previous).get("wall_time_s", 0.0) if previous.exists() else 0.0
        write_json(self.run / "manifest.json", {
            "model_id": self.info.model_id, "weights_sha256": self.info.weights_sha256, "backend": self.backend.name,
            "dtype": str(next(self.model.hf.parameters()).dtype).replace("torch.", ""), "bos": self.bos,
            "seed": self.config.seed, "lengths": self.config.lengths, "config": asdict(self.config),
            "versions": versions, "wall_time_s": earlier + wall_time, "info": self.info.to_dict(),
        })
