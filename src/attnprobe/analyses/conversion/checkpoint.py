"""A conversion directory's checkpoints: what a checkpoint must match to be resumed, and its atomic save."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.embedded import file_sha256
from attnprobe.hooks.model import Model
from attnprobe.probe.rundir import _atomic, read_json, write_json

if TYPE_CHECKING:
    from attnprobe.analyses.conversion.data import TrainingData
    from attnprobe.analyses.conversion.train import ConvertConfig

CHECKPOINT, CONVERSION, ADAPTERS, FIT = "checkpoint.json", "conversion.json", "adapters.safetensors", "fit"
FORMAT = 1



def _identity(model: Model, config: ConvertConfig, heads: Mapping[int, list[int]], data: TrainingData) -> dict:
    """What a checkpoint must match to be resumed. Not the accumulation steps: they split the same global batch
    (the same gradient up to rounding), so a run that ran out of memory resumes with more of them; nor how often
    checkpoints are taken."""
    return {"format": FORMAT, "model_hash": model.info.weights_sha256, "kernel": config.kernel,
            "heads": {str(layer): list(h) for layer, h in sorted(heads.items())}, "config": _recipe(asdict(config)),
            "data_sha256": data.description["sha256"]}


def _recipe(config: Mapping) -> dict:
    return {key: value for key, value in config.items() if key not in ("accumulation", "checkpoint_minutes")}


def _recorded(identity: Mapping) -> dict:
    """A saved identity as it compares with `_identity` (manifests written before accumulation left the recipe
    hold it)."""
    config = identity.get("config")
    return {**identity, "config": _recipe(config)} if isinstance(config, dict) else dict(identity)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {f"optim.{index}.{key}": value.detach().contiguous().cpu()
               for index, entries in state["state"].items() for key, value in entries.items()}
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(directory: Path, identity: dict, progress: dict, named: Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> None:
    """Tensors first (a new file per step), then the manifest that names them: a kill at any point leaves
    the previous checkpoint intact."""
    tensors, groups = _optimizer_tensors(optimizer)
    tensors.update({key: value.detach().contiguous().cpu() for key, value in named.items()})
    name = f"checkpoint-{progress['stage']}-{progress['step']:06d}.safetensors"
    _atomic(directory / name, lambda temp: save_file(tensors, temp))
    previous = read_json(directory / CHECKPOINT)["tensors"] if (directory / CHECKPOINT).exists() else None
    write_json(directory / CHECKPOINT, {**identity, **progress, "param_groups": groups, "tensors": name,
                                        "tensors_sha256": file_sha256(directory / name)})
    if previous and previous != name:
        (directory / previous).unlink(missing_ok=True)


def load_checkpoint(directory: Path, identity: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(manifest, tensors) of the checkpoint in `directory`, None when there is none; refuses a foreign or damaged one."""
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    fix = f"move {directory} away or pass another --out to start over"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):  # OSError: a folder in its place, say
        manifest = None
    if not isinstance(manifest, dict):
        raise AttnprobeError(f"checkpoint {path} is not valid JSON of a checkpoint manifest (a damaged file): {fix}")
    recorded = _recorded(manifest)
    for key, want in identity.items():
        have = recorded.get(key)
        if have != want:
            what = {"model_hash": "other model weights", "kernel": "another kernel", "heads": "other heads",
                    "data_sha256": "other training data", "config": "another recipe"}.get(key, f"another {key}")
            detail = f" ({str(have)[:12]} != {str(want)[:12]})" if key in ("model_hash", "kernel", "data_sha256") else ""
            if key == "config" and isinstance(have, dict):
                changed = [name for name in want if have.get(name) != want[name]]
                detail = f" ({', '.join(f'{name} {have.get(name)} != {want[name]}' for name in changed[:2])})" if changed else ""
            raise AttnprobeError(f"checkpoint {path} was made for {what}{detail}: rerun with the same options, or {fix}")
    tensors_path = directory / manifest.get("tensors", "")
    if not tensors_path.is_file() or file_sha256(tensors_path) != manifest.get("tensors_sha256"):
        raise AttnprobeError(f"checkpoint tensors {tensors_path} are missing or damaged (sha256 differs from {path}): {fix}")
    try:
        return manifest, load_file(tensors_path)
    except SafetensorError as error:
        raise AttnprobeError(f"cannot read checkpoint tensors {tensors_path} ({error}): {fix}") from None


