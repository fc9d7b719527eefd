"""Two-stage conversion of softmax heads to another kernel (LoLCATs-style), and its fine-tuned control.

    stage 1  attention transfer: every replaced head's kernel is fitted to its softmax teacher's z on
             the teacher's own q, k, v (heads are independent given their inputs, so one teacher pass
             feeds every layer), mini-batches, warmup + cosine learning rate, per-head error recorded
    stage 2  end to end: KL from the teacher's next-token distribution (plus `ce_weight` x next-token
             loss) trains the kernels' parameters and LoRA adapters on q/k/v/o (peft), or the kernels
             alone, or every attention parameter

The control is the unmodified model through the identical stage 2 ("softmax, fine-tuned"). Training runs
the replaced heads inside `backend.patched` with gradients and `kernels.dispatch.differentiable()`: the
quadratic form up to 1,024 tokens, the chunked torch form beyond (our Triton kernels are forward-only;
flash-linear-attention's ops have a backward and stay on where it is right on this device); evaluation runs the
fast forms, and tests hold the two equal. Stage 2 runs as `stage2.FastPath` says (by default the KL from hidden
states without full-vocabulary logits, frozen weights bf16 and liger-kernel's fused ops on CUDA). Any registered kernel converts: stage 1 trains whatever `kernel.parameters()` holds.

Accelerate does the plumbing: device, bf16 autocast on CUDA, gradient accumulation and data parallelism
(`accelerate launch --num_processes N attnprobe convert ...`: each process takes its slice of every global
batch). A conversion directory holds

    checkpoint.json + checkpoint-STAGE-STEP.safetensors   every `checkpoint_every` steps and every `checkpoint_minutes`
                                                          (kernels, adapters, optimizer moments, the data position;
                                                          the manifest names the file and its sha256; tens of MB):
                                                          rerunning the same command resumes there, on any machine
    fit/                                                  the converted kernels (kernels.fit format: swap --kernel reads it)
    adapters.safetensors                                  LoRA (or attention) parameters
    conversion.json                                       model hash, data, budget, per-step loss curves (and stage 2's KL
                                                          on one fixed batch before and after), per-head errors, speed
"""
from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from attnprobe.hooks.backends import Backend
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model
from attnprobe.hooks.swap import collect_teacher, kernel_edit
from attnprobe.kernels.fit import LOSS_SCALE, FitResult, load_fit, save_fit, transfer_loss
from attnprobe.kernels.registry import make_kernel
from attnprobe.probe.rundir import _atomic, read_json, readable, write_json

from attnprobe.analyses.conversion.checkpoint import (ADAPTERS, CHECKPOINT, CONVERSION, FIT, _identity, _load_optimizer, _recorded,
                                                      load_checkpoint, save_checkpoint)
from attnprobe.analyses.conversion.config import ConvertConfig  # torch-free, so the CLI reads it at once
from attnprobe.analyses.conversion.data import TrainingData
from attnprobe.analyses.conversion.stage2 import distillation_loss  # noqa: F401  (re-exported: part of this module's interface)
from attnprobe.analyses.conversion.stage2 import FastPath, Stage2Step, frozen_in_bf16, fused_ops, recomputed_layers

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def lr_at(step: int, steps: int, base: float, warmup: float, floor: float) -> float:
    """Linear warmup over the first `warmup` fraction of steps, then cosine from `base` to `floor` x base."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return base * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- the modules that train --------------------------------------------------------------------------------


class Transfer(nn.Module):
    """Stage 1: the kernels of every replaced layer; forward(teachers) -> per-head MSE of each layer."""

    def __init__(self, kernels: Mapping[int, nn.Module], heads: Mapping[int, list[int]]) -> None:
        super().__init__()
        self.kernels = nn.ModuleDict({str(layer): kernel for layer, kernel in kernels.items()})
        self.heads = {int(layer): list(h) for layer, h in heads.items()}

    def forward(self, teachers) -> dict[int, torch.Tensor]:
        losses = {}
        for layer, heads in self.heads.items():
            teacher = teachers[layer].heads(heads)
            kernel = self.kernels[str(layer)]
            # one layer's graph at a time: its intermediates are recomputed in the backward pass
            losses[layer] = torch.utils.checkpoint.checkpoint(lambda q, k, v, z, kernel=kernel, scaling=teacher.scaling:
                                                              transfer_loss(kernel, type(teacher)(q, k, v, z, scaling)),
                                                              teacher.q, teacher.k, teacher.v, teacher.z, use_reentrant=False)
        return losses


class Student(nn.Module):
    """Stage 2: the HF model (with adapters) and its kernels; run it inside `backend.patched(self.edits)`."""

    def __init__(self, hf: nn.Module, kernels: Mapping[int, nn.Module], heads: Mapping[int, list[int]], length: int,
                 hidden: bool = False) -> None:
        super().__init__()
        self.hf, self.hidden = hf, hidden  # hidden: return the final hidden states (the loss applies the LM head)
        self.kernels = nn.ModuleDict({str(layer): kernel for layer, kernel in kernels.items()})
        # whole sequences, no state: each kernel's train_forward picks its form (fla, quadratic or chunked)
        self.edits = [kernel_edit(layer, heads[layer], self.kernels[str(layer)], recompute=True) for layer in sorted(heads)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _run(self.hf, ids, self.hidden)


def _run(hf: nn.Module, ids: torch.Tensor, hidden: bool) -> torch.Tensor:
    """The model's logits, or its final hidden states (what the LM head reads)."""
    if hidden:
        return hf.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    return hf(input_ids=ids, use_cache=False).logits


# ---- adapters ----------------------------------------------------------------------------------------------


def _lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(ATTENTION_PROJECTIONS), bias="none")


def _attention_parameters(hf: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in hf.named_parameters() if any(f".{proj}." in name for proj in ATTENTION_PROJECTIONS)}


@contextmanager
def adapted(model: Model, train: str, rank: int, state: Mapping[str, torch.Tensor] | None = None) -> Iterator[dict]:
    """The model with its stage-2 parameters in place for the block; yields {name: parameter} to train.

    lora: peft adapters on q/k/v/o (removed again afterwards); attention: the projections themselves
    (restored afterwards); kernels: nothing inside the model. `state` loads saved values."""
    hf = model.hf
    if train == "kernels":
        yield {}
        return
    if train == "attention":
        original = {name: p.detach().clone() for name, p in _attention_parameters(hf).items()}
        params = _attention_parameters(hf)
        try:
            _copy_into(params, state)
            for p in params.values():
                p.requires_grad_(True)
            yield params
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.requires_grad_(False)
                    p.copy_(original[name])
        return
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`: not our call
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(hf, _lora_config(rank))
    try:
        params = {name: p for name, p in hf.named_parameters() if p.requires_grad}
        _copy_into(params, state)
        yield params
    finally:
        peft_model.unload()
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in hf.__dict__:
                delattr(hf, attribute)


def _copy_into(params: Mapping[str, nn.Parameter], state: Mapping[str, torch.Tensor] | None) -> None:
    if not state:
        return
    missing = sorted(set(params) - set(state))
    if missing or len(state) != len(params):
        raise AttnprobeError(f"saved adapters do not match this model ({len(state)} tensors for {len(params)} parameters, "
                             f"e.g. {(missing or sorted(set(state) - set(params)))[0]} unmatched): convert again into a fresh --out")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


@contextmanager
def teacher_view(model: Model, train: str) -> Iterator[nn.Module]:
    """A module computing the unmodified model's logits while stage-2 parameters sit in `model.hf`."""
    if train == "lora":
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in model.hf.modules() if isinstance(m, BaseTunerLayer)]

        @contextmanager
        def disabled():
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in layers:
                    layer.enable_adapters(True)
        yield _Switched(model.hf, disabled)
    elif train == "attention":
        yield _Switched(copy.deepcopy(model.hf), nullcontext)
    else:
        yield _Switched(model.hf, nullcontext)


class _Switched:
    def __init__(self, hf, context):
        self.hf, self.context = hf, context

    def __call__(self, ids, hidden: bool = False):
        with self.context(), torch.no_grad():
            return _run(self.hf, ids, hidden)


# ---- the training loops ------------------------------------------------------------------------------------


@dataclass
class Progress:
    """What a stage reports after each optimizer step (for the progress bar and tests)."""

    stage: str
    step: int
    steps: int
    loss: float
    tokens_per_s: float


def _accelerator(accumulation: int):
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    return Accelerator(mixed_precision="bf16" if cuda else "no", gradient_accumulation_steps=accumulation, cpu=not cuda)


def _local_batches(windows: torch.Tensor, step: int, config: ConvertConfig, rank: int, world: int) -> list[torch.Tensor]:
    """This process's micro-batches of global step `step`: rows [rank x local, (rank + 1) x local) of each
    accumulation slice, so every process count sees the same global batch."""
    batch = windows[step * config.batch:(step + 1) * config.batch]
    micro = config.batch // config.accumulation
    local = micro // world
    return [batch[a * micro + rank * local:a * micro + (rank + 1) * local] for a in range(config.accumulation)]


def _train_stage(stage: str, accelerator, module: nn.Module, params: dict[str, nn.Parameter], windows: torch.Tensor,
                 config: ConvertConfig, lr: float, step_loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 directory: Path, identity: dict, resume: tuple[dict, dict] | None, losses: dict[str, list[float]],
                 on_step: Callable[[Progress], None]) -> None:
    """Run `stage` over `windows` (one optimizer step per `config.batch` rows), checkpointing as it goes;
    appends each step's loss to `losses[stage]`."""
    steps = len(windows) // config.batch
    curve = losses.setdefault(stage, [])
    named = list(params.items())
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    start = 0
    if resume is not None and resume[0]["stage"] == stage:
        manifest, tensors = resume
        missing = [name for name, _ in named if f"param.{name}" not in tensors]
        if missing:  # e.g. a Hedgehog checkpoint from before its query and key maps were separate
            raise AttnprobeError(f"the checkpoint holds no {missing[0]} (an older form of {stage}'s parameters): pass a new --out to start over")
        with torch.no_grad():
            for name, p in named:
                p.copy_(tensors[f"param.{name}"])
        _load_optimizer(optimizer, tensors, manifest["param_groups"])
        start = manifest["step"]
        curve[:] = manifest["losses"][stage]
    prepared, optimizer = accelerator.prepare(module, optimizer)
    saved_at = time.monotonic()
    for step in range(start, steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, config.warmup, config.min_lr)
        total = torch.zeros((), device=accelerator.device)
        for ids in _local_batches(windows, step, config, accelerator.process_index, accelerator.num_processes):
            with accelerator.accumulate(prepared):
                loss = step_loss(prepared, ids.to(accelerator.device))
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            total += loss.detach() / config.accumulation
        curve.append(float(accelerator.reduce(total, reduction="mean")))
        done = step + 1
        if done % config.checkpoint_every == 0 or done == steps or _time_for_checkpoint(accelerator, saved_at, config):
            saved_at = time.monotonic()
            if accelerator.is_main_process:
                # the data position: the stage's sequences are read in order, so the next is done x batch
                progress = {"stage": stage, "step": done, "steps": steps, "next_sequence": done * config.batch, "losses": losses}
                save_checkpoint(directory, identity, progress, {f"param.{n}": p for n, p in named}, optimizer)
            accelerator.wait_for_everyone()
        seconds = time.perf_counter() - began
        on_step(Progress(stage, done, steps, curve[-1], config.batch * config.length / max(seconds, 1e-9)))


def packed(windows: torch.Tensor, config: ConvertConfig) -> torch.Tensor:
    """The training sequences: data windows of `config.window` tokens (0: `length`) side by side, `length` each."""
    width = config.window or config.length
    if windows.shape[1] != width:
        raise AttnprobeError(f"training windows are {windows.shape[1]} tokens but the recipe says {width}")
    if config.length % width:
        raise AttnprobeError(f"--length {config.length} does not pack whole windows of {width} tokens: make it a "
                             f"multiple of --window {width}, e.g. {config.length // width * width or width}")
    per = config.length // width
    return windows[:len(windows) // per * per].reshape(-1, config.length)


def _time_for_checkpoint(accelerator, saved_at: float, config: ConvertConfig) -> bool:
    """Whether `checkpoint_minutes` have passed since the last checkpoint, by the main process's clock (every
    process must agree, or the others would wait for a checkpoint that never comes)."""
    if not config.checkpoint_minutes:
        return False
    due = torch.tensor(float(time.monotonic() - saved_at >= 60 * config.checkpoint_minutes), device=accelerator.device)
    if accelerator.num_processes > 1:
        due = accelerator.reduce(due * float(accelerator.is_main_process), reduction="sum")
    return bool(due > 0)


def stage_windows(config: ConvertConfig) -> tuple[int, int]:
    """(stage-1 windows, stage-2 windows), in that order in the training data. The control skips stage 1's windows
    too, so it trains on the rows' stage-2 windows."""
    return (config.steps(config.transfer_tokens) * config.batch if config.transfer_tokens else 0,
            config.steps(config.tokens) * config.batch if config.tokens else 0)


def stage_data_windows(config: ConvertConfig) -> tuple[int, int]:
    """`stage_windows` counted in data windows: with --window, each training sequence packs length / window of them,
    so a mix placed by sequence counts would fall on the first sequences' windows only."""
    per = config.length // (config.window or config.length)
    transfer, e2e = stage_windows(config)
    return transfer * per, e2e * per


def convert(model: Model, backend: Backend, heads: Mapping[int, Sequence[int]], config: ConvertConfig, data: TrainingData,
            directory: Path, on_step: Callable[[Progress], None] = lambda p: None, recompute_layers: bool = False,
            fast: FastPath | None = None) -> dict:
    """Convert `heads` ({layer: heads}, empty for the control) of `model` with `config`; write `directory`.
    `recompute_layers` trades stage 2's activation memory for one more forward (`recomputed_layers`); `fast`
    says how stage 2 runs (default: the chunked loss without full logits, frozen weights bf16 on CUDA). Neither
    changes the result beyond rounding, so neither is part of the recipe a checkpoint must match.

    Returns the conversion manifest. Rerunning with the same arguments resumes from the last checkpoint."""
    directory = Path(directory)
    heads = {int(layer): sorted(int(h) for h in hs) for layer, hs in heads.items() if hs}
    finished = _finished(directory)
    if finished is not None:
        if _recorded(finished.get("identity") or {}) == _identity(model, config, heads, data):
            return finished
        raise AttnprobeError(f"{directory} holds a finished conversion with other settings: pass another --out or move it away")
    accelerator = _accelerator(config.accumulation)
    config.check(accelerator.num_processes)
    if model.device != accelerator.device:  # under accelerate launch every process holds the model on its own GPU
        model.hf.to(accelerator.device)
    n_skip, n_transfer, n_e2e, sequences = _plan(model, heads, config, data)
    directory.mkdir(parents=True, exist_ok=True)
    identity = _identity(model, config, heads, data)
    resume = load_checkpoint(directory, identity)
    kernels = {layer: make_kernel(config.kernel, len(hs), model.info.head_dim, **config.options).to(model.device)
               for layer, hs in heads.items()}
    learnable = {f"kernel.{layer}.{name}": p for layer, kernel in kernels.items()
                 for name, p in kernel.named_parameters() if p.requires_grad}
    started = time.perf_counter()
    transfer_windows = sequences[:n_transfer]
    e2e_windows = sequences[n_skip:n_skip + n_e2e]
    losses: dict[str, list[float]] = dict(resume[0]["losses"]) if resume is not None else {}

    if learnable and n_transfer and (resume is None or resume[0]["stage"] == "transfer"):
        _transfer(accelerator, backend, kernels, heads, learnable, transfer_windows, config, directory, identity, resume,
                  losses, on_step)
        resume = load_checkpoint(directory, identity)
    micro = config.batch // config.accumulation
    errors_after_transfer = _head_errors(backend, kernels, heads, transfer_windows[:config.batch] if n_transfer else e2e_windows[:1],
                                         accelerator, micro) if heads else {}

    # stage 2: KL to the teacher through the whole model, kernels and adapters together
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn from the global generator
    fast = fast or FastPath()
    fast.check(config.ce_weight)
    with adapted(model, config.train, config.lora_rank) as adapter_params, frozen_in_bf16(model.hf, fast.bf16_weights and model.device.type == "cuda"), \
            fused_ops(model.hf, fast.fused_ops):
        params = {**learnable, **{f"adapter.{name}": p for name, p in adapter_params.items()}}
        if resume is not None and resume[0]["stage"] == "transfer":  # carry stage 1's kernels into stage 2
            with torch.no_grad():
                for name, p in learnable.items():
                    p.copy_(resume[1][f"param.{name}"])
            resume = None
        student = Student(model.hf, kernels, heads, config.length, hidden=fast.loss != "logits")
        with teacher_view(model, config.train) as teacher:
            e2e_step = Stage2Step(model.hf, backend, student.edits, teacher, fast, config.ce_weight, accelerator.autocast)

            probe = e2e_windows[:config.batch].to(accelerator.device)

            def kl() -> float:  # on one fixed batch, before and after: the training curve itself is noisy
                with torch.no_grad():
                    return _mean_over(probe, micro, lambda ids: float(e2e_step(student, ids))) if len(probe) else math.nan

            if resume is None:  # a resumed stage 2 has it in its checkpoint's losses
                losses["first_batch_kl"] = [kl()]
            if params and n_e2e:
                with recomputed_layers(model.hf, backend) if recompute_layers or fast.recompute_layers else nullcontext():
                    _train_stage("end_to_end", accelerator, student, params, e2e_windows, config, config.lr, e2e_step,
                                 directory, identity, resume, losses, on_step)
            losses["first_batch_kl"] = losses["first_batch_kl"][:1] + [kl()]
        saved_adapters = {name: p.detach().cpu().clone() for name, p in adapter_params.items()}
    errors = _head_errors(backend, kernels, heads, e2e_windows[:config.batch] if n_e2e else transfer_windows[:1],
                          accelerator, micro) if heads else {}
    manifest = _write_conversion(model, directory, config, heads, kernels, data, identity, losses, errors_after_transfer,
                                 errors, saved_adapters, (n_transfer, n_e2e), time.perf_counter() - started, accelerator)
    accelerator.wait_for_everyone()
    return manifest


def _transfer(accelerator, backend: Backend, kernels, heads, learnable, windows, config: ConvertConfig, directory: Path,
              identity, resume, losses, on_step) -> None:
    """Stage 1: every layer's kernels against that layer's teacher, all from one softmax pass per micro-batch."""
    layers = sorted(heads)

    def transfer_step(module, ids):
        with accelerator.autocast():
            teachers = collect_teacher(backend, ids, layers)
        per_head = module(teachers)
        return LOSS_SCALE * torch.cat(list(per_head.values())).mean()

    _train_stage("transfer", accelerator, Transfer(kernels, heads), learnable, windows, config, config.transfer_lr,
                 transfer_step, directory, identity, resume, losses, on_step)


def _plan(model: Model, heads: Mapping[int, list[int]], config: ConvertConfig, data: TrainingData):
    """(stage-1 sequences the data holds first, those stage 1 trains on, stage 2's, the packed sequences), every
    head and the budget checked against the model and the data."""
    config.check_length(model.info.max_context)
    if heads and config.kernel is None:
        raise AttnprobeError("heads to replace need a kernel: pass --kernel")
    for layer, hs in heads.items():
        bad = [h for h in hs if not 0 <= h < model.info.n_heads]
        if not 0 <= layer < model.info.n_layers or bad:
            raise AttnprobeError(f"head selection outside the model (layer {layer}, heads {bad or hs}): it has layers "
                                 f"0-{model.info.n_layers - 1} and heads 0-{model.info.n_heads - 1}")
    n_skip, n_e2e = stage_windows(config)
    sequences = packed(data.windows, config)
    if len(sequences) < n_skip + n_e2e:
        raise AttnprobeError(f"the training data holds {len(sequences)} sequences but the budget needs {n_skip + n_e2e}: "
                             "lower --tokens / --transfer-tokens or provide more data")
    return n_skip, n_skip if heads else 0, n_e2e, sequences


def _write_conversion(model: Model, directory: Path, config: ConvertConfig, heads, kernels, data: TrainingData, identity,
                      losses, errors_after_transfer, errors, saved_adapters, counts: tuple[int, int], seconds: float,
                      accelerator) -> dict:
    """The conversion manifest, and (main process) the fitted kernels, adapters and conversion.json."""
    n_transfer, n_e2e = counts
    layers = sorted(heads)
    manifest = {
        "identity": identity, "model_id": model.info.model_id, "model_hash": model.info.weights_sha256,
        "kernel": config.kernel, "options": kernels[layers[0]].options() if layers else {}, "train": config.train,
        "heads": {str(layer): hs for layer, hs in heads.items()}, "config": asdict(config), "data": data.description,
        "budget": {"transfer_tokens": n_transfer * config.length, "tokens": n_e2e * config.length,
                   "transfer_steps": n_transfer // config.batch, "steps": n_e2e // config.batch},
        "losses": losses, "head_error_after_transfer": errors_after_transfer, "head_error": errors,
        "processes": accelerator.num_processes, "seconds": round(seconds, 2),
    }
    accelerator.free_memory()
    if accelerator.is_main_process:
        if heads:
            fit = FitResult(config.kernel, manifest["options"], kernels, heads,
                            {layer: errors[str(layer)] for layer in layers}, manifest["budget"]["transfer_steps"],
                            manifest["budget"]["transfer_tokens"], seconds)
            save_fit(fit, directory / FIT, model.info.weights_sha256)
        _atomic(directory / ADAPTERS, lambda temp: save_file({k: v.contiguous() for k, v in saved_adapters.items()}, temp,
                                                             metadata={"train": config.train, "model_hash": model.info.weights_sha256}))
        write_json(directory / CONVERSION, manifest)
    return manifest


def _finished(directory: Path) -> dict | None:
    """The finished conversion's manifest; None when there is none, or it is damaged (then it is made again, from
    the last checkpoint, which a finished run keeps)."""
    path = directory / CONVERSION
    if not path.exists():
        return None
    manifest = read_json(path) if readable(path) else None
    if isinstance(manifest, dict) and isinstance(manifest.get("identity"), dict):
        return manifest
    sys.stderr.write(f"attnprobe: {path} is damaged; converting again from the last checkpoint\n")
    path.unlink()
    return None


def _mean_over(ids: torch.Tensor, micro: int, measure: Callable[[torch.Tensor], Any]) -> Any:
    """`measure` (a mean over its sequences: a number or a tensor) of all of `ids`, run `micro` sequences at a time
    as training runs them, so a probe's number does not depend on the accumulation steps."""
    pieces = ids.split(max(1, micro))
    return sum(measure(piece) * (len(piece) / len(ids)) for piece in pieces)  # one piece: its own number, exactly


def _head_errors(backend, kernels, heads, ids, accelerator, micro: int) -> dict[str, list[float]]:
    """Per-head MSE against the softmax teacher on `ids` (the model as it is now, adapters included)."""
    if len(ids) == 0:
        return {}

    def errors(piece: torch.Tensor) -> torch.Tensor:  # layers x heads would be ragged: one flat vector
        with torch.no_grad(), accelerator.autocast():
            teachers = collect_teacher(backend, piece.to(accelerator.device), sorted(heads))
            return torch.cat([transfer_loss(kernels[layer], teachers[layer].heads(heads[layer])) for layer in heads])
    flat = _mean_over(ids, micro, errors).tolist()
    result, start = {}, 0
    for layer in heads:
        result[str(layer)], start = flat[start:start + len(heads[layer])], start + len(heads[layer])
    return result


def conversion_from_checkpoint(model: Model, directory: Path) -> dict:
    """Turn the stage-2 checkpoint of an unfinished conversion into a conversion `applied` reads: the kernels and
    adapters as they stood, the budget the tokens trained so far, `partial` where it stopped (its learning rate had
    not finished its cosine). A run cut short, or a point on the way to the full budget, is then evaluated as what
    it is; rerunning the full `convert` afterwards refuses the directory, so move the checkpoint first to go on."""
    directory = Path(directory)
    if (directory / CONVERSION).exists():
        raise AttnprobeError(f"{directory} already holds a finished conversion: nothing to take from its checkpoint")
    loaded = load_checkpoint(directory, {"model_hash": model.info.weights_sha256})  # refuses damage and other weights
    if loaded is None:
        raise AttnprobeError(f"{directory} holds no {CHECKPOINT}: run attnprobe convert into it first")
    manifest, tensors = loaded
    if manifest["stage"] != "end_to_end":
        raise AttnprobeError(f"checkpoint {directory / CHECKPOINT} stopped in stage 1 (attention transfer): no end-to-end "
                             "step to evaluate yet")
    identity = {key: manifest[key] for key in ("format", "model_hash", "kernel", "heads", "config", "data_sha256")}
    config = ConvertConfig(**manifest["config"])
    heads = {int(layer): hs for layer, hs in manifest["heads"].items()}
    kernels = {layer: make_kernel(config.kernel, len(hs), model.info.head_dim, **config.options) for layer, hs in heads.items()}
    with torch.no_grad():
        for layer, kernel in kernels.items():
            state = kernel.state_dict()
            missing = [name for name in state if f"param.kernel.{layer}.{name}" not in tensors]
            if missing:  # a fixed tensor the checkpoint does not hold (it is only written with the finished fit)
                raise AttnprobeError(f"checkpoint in {directory} does not hold {config.kernel}'s {missing[0]}: finish the conversion instead")
            kernel.load_state_dict({name: tensors[f"param.kernel.{layer}.{name}"] for name in state})
    adapters = {key.removeprefix("param.adapter."): value for key, value in tensors.items() if key.startswith("param.adapter.")}
    trained = manifest["step"] * config.batch * config.length
    transfer_steps = len(manifest["losses"].get("transfer", []))
    result = {
        "identity": identity, "model_id": model.info.model_id, "model_hash": model.info.weights_sha256,
        "kernel": config.kernel, "options": kernels[min(kernels)].options() if kernels else {}, "train": config.train,
        "heads": manifest["heads"], "config": manifest["config"], "data": {"sha256": manifest["data_sha256"]},
        "budget": {"transfer_tokens": transfer_steps * config.batch * config.length, "tokens": trained,
                   "transfer_steps": transfer_steps, "steps": manifest["step"]},
        "partial": {"step": manifest["step"], "steps": manifest["steps"], "checkpoint": manifest["tensors"]},
        "losses": manifest["losses"], "head_error_after_transfer": {}, "head_error": {},
    }
    if kernels:
        fit = FitResult(config.kernel, result["options"], kernels, heads, {layer: [] for layer in heads}, transfer_steps,
                        result["budget"]["transfer_tokens"])
        save_fit(fit, directory / FIT, model.info.weights_sha256)
    _atomic(directory / ADAPTERS, lambda temp: save_file({k: v.contiguous() for k, v in adapters.items()}, temp,
                                                         metadata={"train": config.train, "model_hash": model.info.weights_sha256}))
    write_json(directory / CONVERSION, result)
    return result


@contextmanager
def applied(model: Model, directory: Path) -> Iterator[FitResult | None]:
    """Put a finished conversion's adapters into `model` for the block; yield its kernels (None for the control)."""
    directory = Path(directory)
    if not (directory / CONVERSION).exists():
        raise AttnprobeError(f"{directory} holds no finished conversion ({CONVERSION} missing): run attnprobe convert first")
    manifest = read_json(directory / CONVERSION) if readable(directory / CONVERSION) else {}
    if not {"model_hash", "heads", "train", "config"} <= set(manifest):
        raise AttnprobeError(f"{directory / CONVERSION} is damaged: rerun the same attnprobe convert to make it again")
    if manifest["model_hash"] != model.info.weights_sha256:
        raise AttnprobeError(f"{directory} was converted from weights {manifest['model_hash'][:12]}, not "
                             f"{model.info.weights_sha256[:12]}: convert this model")
    try:
        state = load_file(directory / ADAPTERS)
    except (SafetensorError, OSError) as error:
        raise AttnprobeError(f"cannot read {directory / ADAPTERS} ({error}): convert again into a fresh --out") from None
    fit = load_fit(directory / FIT, model.info.weights_sha256) if manifest["heads"] else None
    if fit is not None:
        for kernel in fit.kernels.values():
            kernel.to(model.device)
    state = {name.removeprefix("adapter."): value.to(model.device) for name, value in state.items()}
    with adapted(model, manifest["train"], manifest["config"]["lora_rank"], state):
        yield fit


