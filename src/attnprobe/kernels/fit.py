"""Attention transfer (LoLCATs stage 1): fit a kernel's per-head parameters to the softmax teacher.

The model is frozen; for every replaced head the kernel's output z on cached teacher inputs is pulled
towards the teacher's z by Adam on 1000 x MSE. Heads are independent given their inputs, so one
layer's heads are fitted together and the per-head error is reported. Parameter-free kernels take
no steps and only get their error measured. `fit_kernels` is the full-batch fit on one teacher pass;
`attnprobe convert` (analyses/convert.py) runs the same `transfer_loss` over mini-batches of many
teacher passes with a learning-rate schedule, then fine-tunes end to end.

Fitted parameters are saved as `params.safetensors` (keys `{layer}.{parameter}`, each (H, ...))
beside `manifest.json` (model hash, kernel, options, layers and heads, steps, tokens, per-head loss).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from attnprobe.errors import AttnprobeError
from attnprobe.io import atomic_write

from .dispatch import differentiable
from .registry import make_kernel
from .base import Kernel

LOSS_SCALE = 1000.0  # as the reference: keeps Adam's steps sensible on small MSEs
# Budget: 30 full-batch Adam steps on 4 x 256 calibration tokens took 10 s (hedgehog) to 28 s
# (sink+window+linear) per SmolLM2 layer (9 heads) on 2 shared CPU cores: all 270 heads in 5-14 min.
DEFAULT_STEPS = 30
DEFAULT_LR = 1e-2
PARAMS_FILE, MANIFEST_FILE = "params.safetensors", "manifest.json"


@dataclass
class TeacherLayer:
    """One layer's cached softmax teacher: q, k, v (after RoPE, k/v repeated for GQA) and z, all (B, H, T, d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    z: torch.Tensor
    scaling: float

    @property
    def tokens(self) -> int:
        return self.q.shape[0] * self.q.shape[2]

    def heads(self, chosen: Sequence[int]) -> "TeacherLayer":
        index = list(chosen)
        return TeacherLayer(self.q[:, index], self.k[:, index], self.v[:, index], self.z[:, index], self.scaling)


def _student(kernel: Kernel, teacher: TeacherLayer) -> torch.Tensor:
    return kernel.train_forward(teacher.q, teacher.k, teacher.v, teacher.scaling)


def transfer_loss(kernel: Kernel, teacher: TeacherLayer) -> torch.Tensor:
    """MSE between the kernel's z and the teacher's z, per head (H,), differentiable (torch paths only)."""
    with differentiable():
        return ((_student(kernel, teacher).float() - teacher.z.float()) ** 2).mean(dim=(0, 2, 3))


def head_errors(kernel: Kernel, teacher: TeacherLayer) -> torch.Tensor:
    """MSE between the kernel's z and the teacher's z, per head: (H,)."""
    with torch.no_grad():
        return transfer_loss(kernel, teacher)


def fit_layer(kernel: Kernel, teacher: TeacherLayer, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR) -> torch.Tensor:
    """Fit `kernel` (covering the teacher's H heads) in place; return the final per-head MSE (H,)."""
    if kernel.n_heads != teacher.q.shape[1]:
        raise AttnprobeError(f"kernel covers {kernel.n_heads} heads but the teacher has {teacher.q.shape[1]}: select the same heads")
    params = [p for p in kernel.parameters() if p.requires_grad]
    if params and steps > 0:
        optimizer = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            (LOSS_SCALE * transfer_loss(kernel, teacher).mean()).backward()
            optimizer.step()
    return head_errors(kernel, teacher)


@dataclass
class FitResult:
    """Fitted kernels per layer, each covering `heads[layer]` (in that order), and their per-head MSE."""

    kernel: str
    options: dict
    kernels: dict[int, Kernel]
    heads: dict[int, list[int]]
    losses: dict[int, list[float]]
    steps: int
    tokens: int
    seconds: float = 0.0


def fit_kernels(name: str, teachers: Mapping[int, TeacherLayer], heads: Mapping[int, Sequence[int]] | None = None,
                steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, progress: bool = False, **options) -> FitResult:
    """Fit kernel `name` to every layer in `teachers` (all heads unless `heads[layer]` is given)."""
    from rich.progress import track

    started = time.perf_counter()
    kernels, chosen, losses = {}, {}, {}
    layers = sorted(teachers)
    for layer in (track(layers, description=f"fitting {name}") if progress else layers):
        teacher = teachers[layer]
        chosen[layer] = list(heads[layer]) if heads and layer in heads else list(range(teacher.q.shape[1]))
        teacher = teacher.heads(chosen[layer])
        kernels[layer] = make_kernel(name, len(chosen[layer]), teacher.q.shape[-1], **options).to(teacher.q.device)
        losses[layer] = fit_layer(kernels[layer], teacher, steps, lr).tolist()
    tokens = teachers[layers[0]].tokens if layers else 0
    options = next(iter(kernels.values())).options() if kernels else dict(options)
    return FitResult(name, options, kernels, chosen, losses, steps, tokens, time.perf_counter() - started)


def save_fit(result: FitResult, directory: str | Path, model_hash: str) -> Path:
    """Write params.safetensors and manifest.json into `directory`; return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{layer}.{key}": value.detach().contiguous().cpu()
               for layer, kernel in result.kernels.items() for key, value in kernel.state_dict().items()}
    manifest = {
        "model_hash": model_hash, "kernel": result.kernel, "options": result.options,
        "layers": sorted(result.kernels), "heads": {str(k): v for k, v in result.heads.items()},
        "steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 3),
        "head_dim": next(iter(result.kernels.values())).head_dim if result.kernels else None,
        "final_loss": {str(k): v for k, v in result.losses.items()},
    }
    atomic_write(directory / PARAMS_FILE, lambda path: save_file(tensors, path))
    atomic_write(directory / MANIFEST_FILE, lambda path: Path(path).write_text(json.dumps(manifest, indent=1)))
    return directory


def load_fit(directory: str | Path, model_hash: str | None = None) -> FitResult:
    """Read a saved fit; with `model_hash`, refuse parameters fitted on other weights."""
    directory = Path(directory)
    if not (directory / MANIFEST_FILE).is_file() or not (directory / PARAMS_FILE).is_file():
        raise AttnprobeError(f"{directory} holds no fitted kernel: expected {MANIFEST_FILE} and {PARAMS_FILE} (run the fit first)")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    if model_hash is not None and manifest["model_hash"] != model_hash:
        raise AttnprobeError(f"{directory} was fitted on weights {manifest['model_hash'][:12]}, not {model_hash[:12]}: refit for this model")
    tensors = load_file(directory / PARAMS_FILE)
    kernels, heads = {}, {}
    for layer in manifest["layers"]:
        heads[layer] = manifest["heads"][str(layer)]
        prefix = f"{layer}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        kernel = make_kernel(manifest["kernel"], len(heads[layer]), manifest["head_dim"], **manifest["options"])
        kernel.load_state_dict(state)
        kernels[layer] = kernel
    losses = {int(k): v for k, v in manifest["final_loss"].items()}
    return FitResult(manifest["kernel"], manifest["options"], kernels, heads, losses, manifest["steps"], manifest["tokens"],
                     manifest.get("seconds", 0.0))
