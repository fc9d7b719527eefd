"""Which implementation runs a kernel: the one "can Triton run here" check of every kernel.

`triton_runs_on(x)` says whether Triton can run on tensors like x at all (CUDA, or CPU under
TRITON_INTERPRET=1); `use_triton(x)` whether a kernel should take its Triton path (CUDA tensors,
Triton installed, not forced off; CPU tensors only inside `triton_on_cpu`).

`force_torch()` (the CLI's --torch-kernels, or ATTNPROBE_TORCH_KERNELS=1) makes every caller take its
torch path. Tests turn on `triton_on_cpu` to send CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from functools import cache

import torch

_force_torch = os.environ.get("ATTNPROBE_TORCH_KERNELS") == "1"
_triton_on_cpu = False
_differentiable = False


def force_torch(flag: bool = True) -> None:
    global _force_torch
    _force_torch = flag


@contextmanager
def torch_forms():
    """Within the block every kernel takes its torch form (what `force_torch` does, for one block)."""
    global _force_torch
    previous, _force_torch = _force_torch, True
    try:
        yield
    finally:
        _force_torch = previous


@contextmanager
def differentiable():
    """Within the block kernels take only paths with a backward: our Triton kernels are forward-only, so
    their callers take the torch forms; fla's ops (autograd functions) stay on. Training runs inside this."""
    global _differentiable
    previous, _differentiable = _differentiable, True
    try:
        yield
    finally:
        _differentiable = previous


@contextmanager
def triton_on_cpu():
    """Within the block, CPU tensors take the Triton path too (needs TRITON_INTERPRET=1)."""
    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        yield
    finally:
        _triton_on_cpu = previous


@cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


def use_triton(x: torch.Tensor) -> bool:
    if _force_torch or _differentiable or not triton_installed():
        return False
    return x.is_cuda or (_triton_on_cpu and x.device.type == "cpu")


@cache
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def use_fla(x: torch.Tensor) -> bool:
    """Whether a gated or delta-rule kernel should run flash-linear-attention's Triton ops: CUDA tensors
    with Triton installed and not forced off, and fla-core installed (its ops do not run on CPU tensors)."""
    return x.is_cuda and not _force_torch and triton_installed() and fla_installed()
