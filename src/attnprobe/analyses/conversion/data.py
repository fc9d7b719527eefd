"""Training text for conversion, as fixed-length token windows, never overlapping evaluation text.

Three sources:

    user files       --data a.txt --data folder/ --data b.jsonl --data c.parquet (a "text" column)
    a HF dataset     --dataset NAME[:CONFIG] through `datasets` (needs a network; offline it fails at once)
    the default      text sampled from the model itself (temperature 1, seeded) from prompts cut out of
                     the training range of the offline prose, mixed with that prose range

Self-samples are cached as token shards (safetensors) under ATTNPROBE_CACHE/samples/, one file per
generate call, so an interrupted sampling resumes and a second conversion of the same model reuses them.
Windows of `length` tokens start with BOS where the tokenizer adds one. The budget is in tokens: it
must fit in the available windows times `epochs`; each epoch is a fresh seeded shuffle.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model, cache_root, hub_reachable
from attnprobe.probe import texts
from attnprobe.probe.rundir import _atomic

PROMPT_TOKENS = 16  # prose tokens that start each self-sample
SAMPLE_BATCH = 32  # sequences per generate call, and per cached shard (a GPU takes 1,024)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass
class TrainingData:
    windows: torch.Tensor  # (N, length) int64, in training order (epochs concatenated)
    description: dict = field(default_factory=dict)  # what the manifest records: sources, tokens, sha256

    @property
    def tokens(self) -> int:
        return self.windows.numel()


def _documents_from_path(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet"))
        if not files:
            raise AttnprobeError(f"{path} holds no .txt, .md, .jsonl or .parquet files: pass files with training text")
        return [doc for file in files for doc in _documents_from_path(file)]
    if not path.is_file():
        raise AttnprobeError(f"training data not found: {path}; pass existing text, JSONL or parquet files or folders")
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(texts.strict_text(path.read_bytes(), f"training data {path}").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise AttnprobeError(f"{path} line {number} is not JSON: each line must be an object with a \"text\" field") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise AttnprobeError(f"{path} line {number} has no \"text\" string: each line must be {{\"text\": ...}}")
            documents.append(texts.strict_text(record["text"], f"training data {path} line {number}"))
        return documents
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            table = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises many kinds for a damaged file
            raise AttnprobeError(f"cannot read {path} as parquet ({type(error).__name__}): pass a valid parquet file") from None
        if "text" not in table:
            raise AttnprobeError(f"{path} has no 'text' column (columns: {', '.join(map(str, table.columns))}): name the text column 'text'")
        column = table["text"].dropna()
        if not all(isinstance(t, (str, bytes)) for t in column):
            raise AttnprobeError(f"{path}'s 'text' column holds values that are not text: store the training text as strings")
        return [texts.strict_text(t, f"training data {path} row {row}") for row, t in column.items()]
    return [texts.strict_text(path.read_bytes(), f"training data {path}")]


def _documents_from_dataset(name: str, split: str = "train", column: str = "text", limit_chars: int | None = None) -> list[str]:
    """Text of a Hugging Face dataset `NAME` or `NAME:CONFIG`, streamed until `limit_chars` characters."""
    if not hub_reachable():
        raise AttnprobeError(f"no network to fetch dataset '{name}' from the Hugging Face hub: "
                             "pass local files with --data, or leave both out to train on self-sampled text")
    try:
        import datasets
    except ImportError:
        raise AttnprobeError("--dataset needs the datasets library: pip install 'attnprobe[datasets]'") from None
    path, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(path, config or None, split=split, streaming=True)
    except Exception as error:  # datasets raises its own and hub errors alike
        raise AttnprobeError(f"cannot load dataset '{name}' ({str(error).splitlines()[0][:120]}): check the name and split") from None
    documents, chars = [], 0
    for record in stream:
        if column not in record:
            raise AttnprobeError(f"dataset '{name}' has no '{column}' column (it has {', '.join(record)})")
        documents.append(str(record[column]))
        chars += len(documents[-1])
        if limit_chars is not None and chars >= limit_chars:
            break
    return documents


def _bos(model: Model) -> list[int]:
    return [model.info.bos_id] if model.info.tokenizer_adds_bos and model.info.bos_id is not None else []


def _pack(model: Model, documents: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Tokenized documents joined by EOS and cut into windows of `length` (BOS first where the tokenizer adds one)."""
    bos = _bos(model)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for document in documents:
        stream += list(document) + ([eos] if eos is not None else [])
    body = length - len(bos)
    n = len(stream) // body
    windows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.tensor(bos, dtype=torch.long).expand(n, len(bos)), windows], dim=1)


def training_prose_ids(model: Model) -> list[int]:
    """The offline prose's whole training range, tokenized (never scored by perplexity, never a haystack)."""
    start, end = texts.token_range(model.tokenizer, "fit")
    return texts.fit_ids(model.tokenizer, end - start)


def _shard_dir(model: Model, length: int, seed: int, batch: int) -> Path:
    return cache_root() / "samples" / f"{model.info.weights_sha256[:16]}-T{length}-P{PROMPT_TOKENS}-s{seed}-b{batch}"


def _read_shard(path: Path, expected: dict) -> torch.Tensor | None:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            if handle.metadata() != expected:
                return None
        return load_file(path)["ids"].long()
    except (SafetensorError, OSError, KeyError):
        return None  # a shard cut short by a kill: generate it again


def self_samples(model: Model, n_windows: int, length: int, seed: int = 0,
                 progress: Callable[[int, int], None] | None = None, batch: int | None = None) -> torch.Tensor:
    """`n_windows` sequences of `length` tokens sampled from the model at temperature 1 (all of its
    vocabulary, no top-k or top-p), each continuing a 16-token prompt cut out of the training prose."""
    prose = training_prose_ids(model)
    bos = _bos(model)
    if len(prose) < 2 * PROMPT_TOKENS:
        raise AttnprobeError(f"the training prose holds only {len(prose)} tokens: too few for sampling prompts")
    if length <= PROMPT_TOKENS + len(bos):
        raise AttnprobeError(f"training sequences of {length} tokens are too short: use at least {2 * PROMPT_TOKENS} tokens")
    batch = batch or SAMPLE_BATCH
    folder = _shard_dir(model, length, seed, batch)
    shards = math.ceil(n_windows / batch)
    out = [torch.empty(0, length, dtype=torch.long)]
    for index in range(shards):
        path = folder / f"shard-{index:05d}.safetensors"
        expected = {"model": model.info.weights_sha256, "seed": str(seed), "shard": str(index), "length": str(length),
                    "batch": str(batch)}
        ids = _read_shard(path, expected) if path.exists() else None
        if ids is None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            starts = torch.randint(0, len(prose) - PROMPT_TOKENS, (batch,), generator=generator).tolist()
            prompts = torch.tensor([bos + prose[s:s + PROMPT_TOKENS] for s in starts], device=model.device)
            torch.manual_seed(seed * 1_000_003 + index)  # generate draws from the global generator
            new = length - prompts.shape[1]
            with torch.no_grad():
                ids = model.hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                        top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                                        pad_token_id=model.info.bos_id or 0).cpu()
            folder.mkdir(parents=True, exist_ok=True)
            _atomic(path, lambda temp, ids=ids: save_file({"ids": ids.to(torch.int32).contiguous()}, temp, metadata=expected))
        out.append(ids.long())
        if progress is not None:
            progress(min(n_windows, (index + 1) * batch), n_windows)
    return torch.cat(out)[:n_windows]


def training_data(model: Model, tokens: int, length: int, paths: Sequence[Path] = (), dataset: str | None = None,
                  seed: int = 0, epochs: int = 1, progress: Callable[[int, int], None] | None = None,
                  sample_batch: int | None = None) -> TrainingData:
    """Windows covering a budget of `tokens` training tokens (rounded up to whole windows)."""
    if tokens <= 0 or length <= 1 or epochs < 1:
        raise AttnprobeError(f"need tokens > 0, length > 1 and epochs >= 1; got {tokens}, {length}, {epochs}")
    if model.info.max_context and length > model.info.max_context:
        raise AttnprobeError(f"training sequences of {length} tokens exceed the model's window of {model.info.max_context}")
    needed = math.ceil(tokens / length)
    if paths or dataset:
        documents = [doc for path in paths for doc in _documents_from_path(Path(path))]
        if dataset:
            documents += _documents_from_dataset(dataset, limit_chars=8 * tokens)  # about 4 characters a token
        from attnprobe.analyses.conversion.pools import refuse_evaluation_text

        refuse_evaluation_text(documents)
        pool = _pack(model, [texts._encode(model.tokenizer, doc) for doc in documents], length)
        sources = {"files": [str(p) for p in paths], "dataset": dataset}
    else:
        prose = _pack(model, [training_prose_ids(model)], length)
        sampled = self_samples(model, max(0, math.ceil(needed / epochs) - len(prose)), length, seed, progress, sample_batch)
        pool = torch.cat([prose, sampled])
        sources = {"self_samples": len(sampled), "prose_windows": len(prose), "temperature": 1.0, "seed": seed}
    if len(pool) * epochs < needed:
        raise AttnprobeError(f"the training data holds {len(pool) * length:,} tokens ({len(pool)} windows of {length}) but the budget "
                             f"of {tokens:,} tokens needs {needed} windows: lower --tokens, add data or raise --epochs")
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(pool), generator=generator) for _ in range(epochs)])[:needed]
    windows = pool[order].contiguous()
    digest = hashlib.sha256(windows.to(torch.int32).numpy().tobytes()).hexdigest()
    return TrainingData(windows, {**sources, "length": length, "windows": needed, "pool_windows": len(pool),
                                  "epochs": epochs, "tokens": needed * length, "sha256": digest})
