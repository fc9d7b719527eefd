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
flash-linear-attention's ops have a backward and stay on); evaluation runs the fast forms, and tests hold
the two equal. Any registered kernel converts: stage 1 trains whatever `kernel.parameters()` holds.

Accelerate does the plumbing: device, bf16 autocast on CUDA, gradient accumulation and data parallelism
(`accelerate launch --num_processes N attnprobe convert ...`: each process takes its slice of every global
batch). A conversion directory holds

    checkpoint.json + checkpoint-STAGE-STEP.safetensors   every `checkpoint_every` steps (kernels, adapters,
                                                          optimizer moments; the manifest names the file and its
                                                          sha256): rerunning the same command resumes there
    fit/                                                  the converted kernels (kernels.fit format: swap --kernel reads it)
    adapters.safetensors                                  LoRA (or attention) parameters
    conversion.json                                       model hash, data, budget, per-step loss curves (and stage 2's KL
                                                          on one fixed batch before and after), per-head errors, speed
"""
from __future__ import annotations

import copy
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from attnprobe.hooks.backends import Backend
from attnprobe.hooks.embedded import file_sha256
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import Model
from attnprobe.hooks.swap import collect_teacher, kernel_edit
from attnprobe.kernels.dispatch import differentiable
from attnprobe.kernels.fit import LOSS_SCALE, FitResult, load_fit, save_fit, transfer_loss
from attnprobe.kernels.registry import make_kernel
from attnprobe.probe.rundir import _atomic, read_json, write_json

from attnprobe.analyses.conversion.data import TrainingData

TRAIN_MODES = ("lora", "kernels", "attention")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
CHECKPOINT, CONVERSION, ADAPTERS, FIT = "checkpoint.json", "conversion.json", "adapters.safetensors", "fit"
FORMAT = 1


@dataclass
class ConvertConfig:
    """One conversion's recipe; everything here is recorded, and all but `accumulation` must match to resume."""

    kernel: str | None = "hedgehog"  # None: the control (no head replaced)
    options: dict = field(default_factory=dict)
    length: int = 1024  # tokens per training sequence
    batch: int = 8  # sequences per optimizer step, over all processes and accumulation steps
    accumulation: int = 1
    transfer_tokens: int = 1 << 20  # stage 1 budget
    tokens: int = 1 << 20  # stage 2 budget
    transfer_lr: float = 1e-2
    lr: float = 1e-3
    warmup: float = 0.05  # fraction of each stage's steps
    min_lr: float = 0.1  # the cosine ends at min_lr x lr
    train: str = "lora"
    lora_rank: int = 8
    ce_weight: float = 0.0
    checkpoint_every: int = 50
    seed: int = 0

    def steps(self, tokens: int) -> int:
        return max(1, tokens // (self.batch * self.length))

    def check(self, world: int) -> None:
        if self.train not in TRAIN_MODES:
            raise AttnprobeError(f"unknown --train '{self.train}': choose one of {', '.join(TRAIN_MODES)}")
        if self.batch % (self.accumulation * world):
            raise AttnprobeError(f"a batch of {self.batch} sequences does not split into {self.accumulation} accumulation steps "
                                 f"x {world} processes: make --batch a multiple of {self.accumulation * world}")
        if min(self.transfer_tokens, self.tokens) < 0 or self.tokens + self.transfer_tokens <= 0:
            raise AttnprobeError("token budgets must be >= 0 and not both 0")


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

    def __init__(self, hf: nn.Module, kernels: Mapping[int, nn.Module], heads: Mapping[int, list[int]], length: int) -> None:
        super().__init__()
        self.hf = hf
        self.kernels = nn.ModuleDict({str(layer): kernel for layer, kernel in kernels.items()})
        # whole sequences, no state: each kernel's train_forward picks its form (fla, quadratic or chunked)
        self.edits = [kernel_edit(layer, heads[layer], self.kernels[str(layer)], recompute=True) for layer in sorted(heads)]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, use_cache=False).logits


@contextmanager
def recomputed_layers(hf: nn.Module, backend: Backend) -> Iterator[None]:
    """Within the block each decoder layer keeps only its inputs for the backward pass and recomputes the rest
    (torch.utils.checkpoint): activation memory of about one layer for one more forward. The backward runs
    after `backend.patched` has closed, so each recomputation re-enters the edit session and the
    differentiable mode its forward ran under (else a replaced head would be recomputed as softmax)."""
    from attnprobe.hooks.backends.base import decoder_layers
    from attnprobe.kernels import dispatch

    def wrapped(forward):
        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            session, flag = backend.session, dispatch._differentiable

            def rerun(*args, **kwargs):
                previous = backend.session, dispatch._differentiable
                backend.session, dispatch._differentiable = session, flag
                try:
                    return forward(*args, **kwargs)
                finally:
                    backend.session, dispatch._differentiable = previous
            return torch.utils.checkpoint.checkpoint(rerun, *args, use_reentrant=False, **kwargs)
        return checkpointed

    if not hasattr(backend, "session"):
        raise AttnprobeError(f"recomputing layers needs the native backend, not {backend.name}")
    layers = list(decoder_layers(hf))
    for layer in layers:
        layer.forward = wrapped(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


KL_CHUNK = 4096  # tokens per piece of the KL: one piece's fp32 log-probabilities exist at a time


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return nn.functional.kl_div(torch.log_softmax(student.float(), dim=-1), torch.log_softmax(teacher.float(), dim=-1),
                                log_target=True, reduction="sum")


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, ce_weight: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over next-token distributions, plus ce_weight x next-token loss.

    The KL runs over pieces of KL_CHUNK tokens, each recomputed in the backward pass: the full-vocabulary fp32
    log-probabilities of a whole batch (two of 3 GiB for SmolLM2 at 32 x 512 tokens) are never held at once."""
    student, target = logits.flatten(0, 1), teacher.flatten(0, 1)
    total = sum(torch.utils.checkpoint.checkpoint(_kl_sum, student[start:start + KL_CHUNK], target[start:start + KL_CHUNK],
                                                  use_reentrant=False)
                for start in range(0, len(student), KL_CHUNK))
    loss = total / len(student)
    if ce_weight:
        loss = loss + ce_weight * nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    return loss


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
    from peft import get_peft_model

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

    def __call__(self, ids):
        with self.context(), torch.no_grad():
            return self.hf(input_ids=ids, use_cache=False).logits


# ---- checkpoints -------------------------------------------------------------------------------------------


def _identity(model: Model, config: ConvertConfig, heads: Mapping[int, list[int]], data: TrainingData) -> dict:
    """What a checkpoint must match to be resumed. Not the accumulation steps: they split the same global batch
    (the same gradient up to rounding), so a run that ran out of memory resumes with more of them."""
    return {"format": FORMAT, "model_hash": model.info.weights_sha256, "kernel": config.kernel,
            "heads": {str(layer): list(h) for layer, h in sorted(heads.items())}, "config": _recipe(asdict(config)),
            "data_sha256": data.description["sha256"]}


def _recipe(config: Mapping) -> dict:
    return {key: value for key, value in config.items() if key != "accumulation"}


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
    except json.JSONDecodeError:
        raise AttnprobeError(f"checkpoint {path} is not valid JSON (a damaged file): {fix}") from None
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
        with torch.no_grad():
            for name, p in named:
                p.copy_(tensors[f"param.{name}"])
        _load_optimizer(optimizer, tensors, manifest["param_groups"])
        start = manifest["step"]
        curve[:] = manifest["losses"][stage]
    prepared, optimizer = accelerator.prepare(module, optimizer)
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
        if done % config.checkpoint_every == 0 or done == steps:
            if accelerator.is_main_process:
                progress = {"stage": stage, "step": done, "steps": steps, "losses": losses}
                save_checkpoint(directory, identity, progress, {f"param.{n}": p for n, p in named}, optimizer)
            accelerator.wait_for_everyone()
        seconds = time.perf_counter() - began
        on_step(Progress(stage, done, steps, curve[-1], config.batch * config.length / max(seconds, 1e-9)))


def convert(model: Model, backend: Backend, heads: Mapping[int, Sequence[int]], config: ConvertConfig, data: TrainingData,
            directory: Path, on_step: Callable[[Progress], None] = lambda p: None, recompute_layers: bool = False) -> dict:
    """Convert `heads` ({layer: heads}, empty for the control) of `model` with `config`; write `directory`.
    `recompute_layers` trades stage 2's activation memory for one more forward (`recomputed_layers`); the
    result is the same, so it is not part of the recipe a checkpoint must match.

    Returns the conversion manifest. Rerunning with the same arguments resumes from the last checkpoint."""
    directory = Path(directory)
    heads = {int(layer): sorted(int(h) for h in hs) for layer, hs in heads.items() if hs}
    if (directory / CONVERSION).exists():
        done = read_json(directory / CONVERSION)
        if _recorded(done.get("identity") or {}) == _identity(model, config, heads, data):
            return done
        raise AttnprobeError(f"{directory} holds a finished conversion with other settings: pass another --out or move it away")
    accelerator = _accelerator(config.accumulation)
    config.check(accelerator.num_processes)
    if model.device != accelerator.device:  # under accelerate launch every process holds the model on its own GPU
        model.hf.to(accelerator.device)
    if heads and config.kernel is None:
        raise AttnprobeError("heads to replace need a kernel: pass --kernel")
    for layer, hs in heads.items():
        bad = [h for h in hs if not 0 <= h < model.info.n_heads]
        if not 0 <= layer < model.info.n_layers or bad:
            raise AttnprobeError(f"head selection outside the model (layer {layer}, heads {bad or hs}): it has layers "
                                 f"0-{model.info.n_layers - 1} and heads 0-{model.info.n_heads - 1}")
    n_transfer = config.steps(config.transfer_tokens) * config.batch if heads and config.transfer_tokens else 0
    n_e2e = config.steps(config.tokens) * config.batch if config.tokens else 0
    if len(data.windows) < n_transfer + n_e2e:
        raise AttnprobeError(f"the training data holds {len(data.windows)} windows but the budget needs {n_transfer + n_e2e}: "
                             "lower --tokens / --transfer-tokens or provide more data")
    if data.windows.shape[1] != config.length:
        raise AttnprobeError(f"training windows are {data.windows.shape[1]} tokens but the recipe says {config.length}")
    directory.mkdir(parents=True, exist_ok=True)
    identity = _identity(model, config, heads, data)
    resume = load_checkpoint(directory, identity)
    kernels = {layer: make_kernel(config.kernel, len(hs), model.info.head_dim, **config.options).to(model.device)
               for layer, hs in heads.items()}
    learnable = {f"kernel.{layer}.{name}": p for layer, kernel in kernels.items()
                 for name, p in kernel.named_parameters() if p.requires_grad}
    started = time.perf_counter()
    transfer_windows = data.windows[:n_transfer]
    e2e_windows = data.windows[n_transfer:n_transfer + n_e2e]
    losses: dict[str, list[float]] = dict(resume[0]["losses"]) if resume is not None else {}
    layers = sorted(heads)

    # stage 1: every layer's kernels against that layer's teacher, all from one softmax pass per micro-batch
    if learnable and n_transfer and (resume is None or resume[0]["stage"] == "transfer"):
        transfer = Transfer(kernels, heads)

        def transfer_step(module, ids):
            with accelerator.autocast():
                teachers = collect_teacher(backend, ids, layers)
            per_head = module(teachers)
            return LOSS_SCALE * torch.cat(list(per_head.values())).mean()

        _train_stage("transfer", accelerator, transfer, learnable, transfer_windows, config, config.transfer_lr,
                     transfer_step, directory, identity, resume, losses, on_step)
        resume = load_checkpoint(directory, identity)
    micro = config.batch // config.accumulation
    errors_after_transfer = _head_errors(backend, kernels, heads, transfer_windows[:config.batch] if n_transfer else e2e_windows[:1],
                                         accelerator, micro) if heads else {}

    # stage 2: KL to the teacher through the whole model, kernels and adapters together
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn from the global generator
    with adapted(model, config.train, config.lora_rank) as adapter_params:
        params = {**learnable, **{f"adapter.{name}": p for name, p in adapter_params.items()}}
        if resume is not None and resume[0]["stage"] == "transfer":  # carry stage 1's kernels into stage 2
            with torch.no_grad():
                for name, p in learnable.items():
                    p.copy_(resume[1][f"param.{name}"])
            resume = None
        student = Student(model.hf, kernels, heads, config.length)
        with teacher_view(model, config.train) as teacher:
            def e2e_step(module, ids):
                with accelerator.autocast():
                    target = teacher(ids)
                with backend.patched(student.edits), differentiable():
                    logits = module(ids)
                    return distillation_loss(logits, target, ids, config.ce_weight)

            probe = e2e_windows[:config.batch].to(accelerator.device)

            def kl() -> float:  # on one fixed batch, before and after: the training curve itself is noisy
                with torch.no_grad():
                    return _mean_over(probe, micro, lambda ids: float(e2e_step(student, ids))) if len(probe) else math.nan

            if resume is None:  # a resumed stage 2 has it in its checkpoint's losses
                losses["first_batch_kl"] = [kl()]
            if params and n_e2e:
                with recomputed_layers(model.hf, backend) if recompute_layers else nullcontext():
                    _train_stage("end_to_end", accelerator, student, params, e2e_windows, config, config.lr, e2e_step,
                                 directory, identity, resume, losses, on_step)
            losses["first_batch_kl"] = losses["first_batch_kl"][:1] + [kl()]
        saved_adapters = {name: p.detach().cpu().clone() for name, p in adapter_params.items()}
    errors = _head_errors(backend, kernels, heads, e2e_windows[:config.batch] if n_e2e else transfer_windows[:1],
                          accelerator, micro) if heads else {}
    seconds = time.perf_counter() - started
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
    accelerator.wait_for_everyone()
    return manifest


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
    manifest = read_json(directory / CONVERSION)
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


# ---- named rows, the control and the gated matrix ----------------------------------------------------------

CONTROL = "control"


def control_variant():
    from attnprobe.analyses.experiments.architectures import Variant, _none

    return Variant(CONTROL, None, _none, "softmax, fine-tuned: the original through the identical stage 2")


def replaced_heads(model: Model, keep: set[tuple[int, int]]) -> dict[int, list[int]]:
    """{layer: heads replaced}, every head not kept softmax."""
    info = model.info
    return {layer: [h for h in range(info.n_heads) if (layer, h) not in keep] for layer in range(info.n_layers)
            if any((layer, h) not in keep for h in range(info.n_heads))}


def parse_tokens(text: str) -> int:
    """'20M', '512K', '1.5M' or '1000' -> a token count."""
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
    text = str(text).strip().upper()
    try:
        return int(float(text[:-1]) * scale[text[-1]]) if text and text[-1] in scale else int(text)
    except ValueError:
        raise AttnprobeError(f"cannot read a token count from '{text}': use e.g. 20M, 512K or 100000") from None


def progress_bar(console=None, disable: bool = False):
    """A rich progress bar and the `on_step` callback that drives it: step, tokens/s, loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Bar(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
              TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
              disable=disable)
    tasks: dict[str, int] = {}

    def on_step(report: Progress, label: str = "") -> None:
        key = f"{label} {report.stage}".strip()
        if key not in tasks:
            tasks[key] = bar.add_task(key, total=report.steps, speed="", loss="")
        bar.update(tasks[key], completed=report.step, speed=f"{report.tokens_per_s:,.0f} tok/s", loss=f"{report.loss:.4g}")
    return bar, on_step


def conversion_matrix(model: Model, backend: Backend, variants: Sequence, config: ConvertConfig, data: TrainingData,
                      out: Path, sizes, heads_table=None, evaluate: bool = True,
                      on_step: Callable[[Progress, str], None] = lambda p, label: None,
                      status: Callable[[str], None] = lambda m: None, recompute_layers: bool = False):
    """Convert each variant (and the control) into out/conversions/NAME, then evaluate every row through the
    matrix code with the gate: (matrix table, recall rows); (None, None) without `evaluate` or off the main process."""
    import dataclasses

    out = Path(out)
    rows_to_convert = [v for v in variants if v.name != "original"]
    for variant in rows_to_convert:
        heads = replaced_heads(model, variant.keep(model, heads_table)) if variant.kernel else {}
        status(f"converting {variant.name}")
        convert(model, backend, heads, dataclasses.replace(config, kernel=variant.kernel), data,
                out / "conversions" / variant.name, on_step=lambda report, name=variant.name: on_step(report, name),
                recompute_layers=recompute_layers)
    from accelerate import PartialState

    if not evaluate or not PartialState().is_main_process:
        return None, None
    return evaluate_conversions(model, backend, rows_to_convert, out, sizes, heads_table, status)


def _with_original(model: Model, variants: Sequence) -> list:
    """The original first, then the variants (a reference row is never converted)."""
    from attnprobe.analyses.experiments.architectures import catalogue

    return [catalogue(model)["original"], *[v for v in variants if v.name != "original"]]


def _conversion_of(model: Model, out: Path, variant):
    """The context that puts `variant`'s conversion into the model (the original has none)."""
    return applied(model, out / "conversions" / variant.name) if variant.name != "original" else nullcontext()


def _same_sizes(folder: Path, sizes) -> None:
    """Rows saved in `folder` are reused by a rerun, so they must have been measured at these sizes: record the
    sizes with the first row, refuse other sizes later (a silently mixed table otherwise)."""
    path, wanted = folder.with_name(f"{folder.name}.sizes.json"), json.loads(json.dumps(asdict(sizes)))
    if path.exists():
        if read_json(path) != wanted:
            changed = sorted(k for k in wanted if read_json(path).get(k) != wanted[k])
            raise AttnprobeError(f"the rows in {folder} were measured with other sizes ({', '.join(changed)}): "
                                 f"rerun with the same options, or remove {folder} (or use another --work) to measure again")
        return
    if folder.exists() and any(folder.glob("*.json")):
        raise AttnprobeError(f"the rows in {folder} do not say which sizes measured them (an older run): "
                             f"remove {folder} (or use another --work) to measure again")
    write_json(path, wanted)


def evaluate_conversions(model: Model, backend: Backend, variants: Sequence, out: Path, sizes, heads_table=None,
                         status: Callable[[str], None] = lambda m: None):
    """Evaluate the original and each variant converted into out/conversions/NAME (resumable per row, each
    finished row in out/variants/) through the matrix code, with the gate: (matrix table, recall rows).
    Needs no training data, so conversions made on one machine are evaluated on another."""
    import pandas as pd

    from attnprobe.analyses.experiments.architectures import evaluate_variant, gate_columns

    out = Path(out)
    _same_sizes(out / "variants", sizes)
    rows, samples = [], []
    for variant in _with_original(model, variants):
        done = out / "variants" / f"{variant.name}.json"
        if done.exists():  # resume: a finished row is not evaluated again
            rows.append(read_json(done))
            samples.append(pd.read_parquet(out / "variants" / f"{variant.name}.parquet"))
            continue
        status(f"evaluating {variant.name}")
        with _conversion_of(model, out, variant) as fit:
            row, recall = evaluate_variant(model, backend, variant, heads_table, out, sizes, status, fit=fit)
        if variant.name != "original":
            row["conversion"] = str(out / "conversions" / variant.name)
            manifest = read_json(out / "conversions" / variant.name / CONVERSION)
            row["stage2_tokens"] = manifest["budget"]["tokens"]
            if "partial" in manifest:  # taken from a checkpoint: say so beside its numbers
                row["partial"] = f"step {manifest['partial']['step']} of {manifest['partial']['steps']}"
        from attnprobe.probe.rundir import write_parquet

        write_parquet(out / "variants" / f"{variant.name}.parquet", recall.drop(columns=["response"], errors="ignore"))
        write_json(done, row)
        rows.append(row)
        samples.append(recall)
    table = gate_columns(pd.DataFrame(rows), model.info.n_layers * model.info.n_heads)
    return table, pd.concat(samples, ignore_index=True).drop(columns=["response"], errors="ignore")


def census_of_conversions(model: Model, backend: Backend, variants: Sequence, out: Path, sizes, heads_table=None,
                          status: Callable[[str], None] = lambda m: None):
    """The small census of the matrix (`census_presence`) re-run inside the original and each variant converted
    into out/conversions/NAME: which mechanisms each converted architecture keeps, measured in its own heads
    (effective attention for the linear ones). Each row is saved in out/census/NAME.json (a rerun resumes);
    returns the table (architecture and the census columns)."""
    import pandas as pd

    from attnprobe.probe.census import resolve_bos

    from attnprobe.analyses.experiments.architectures import census_presence, variant_edits

    out = Path(out)
    bos = resolve_bos(sizes.bos, model)
    _same_sizes(out / "census", sizes)
    rows = []
    for variant in _with_original(model, variants):
        done = out / "census" / f"{variant.name}.json"
        if not done.exists():
            status(f"census of {variant.name}")
            with _conversion_of(model, out, variant) as fit:
                edits = variant_edits(model, fit, variant.keep(model, heads_table)) if variant.kernel else []
                with backend.standing_edits(edits):
                    columns = census_presence(model, backend, out / "census" / variant.name, sizes, bos)
            write_json(done, {"architecture": variant.name, **columns})
        rows.append(read_json(done))
    return pd.DataFrame(rows)


def run(model: Model, out: Path, *, kernel: str | None, heads: str | None, layers: str | None, from_run: Path | None,
        variants: str | None, control: bool, tokens: str, transfer_tokens: str, length: int, batch: int, accumulation: int,
        lr: float, transfer_lr: float, train: str, lora_rank: int, ce_weight: float, data: Sequence[Path],
        dataset: str | None, epochs: int, seed: int, checkpoint_every: int, evaluate: bool, census: bool, quick: bool,
        console=None, recompute_layers: bool = False):
    """The `attnprobe convert` command: check everything, gather the data, convert every row, evaluate, write the matrix."""
    import pandas as pd

    from attnprobe.hooks.backends import make_backend
    from attnprobe.kernels.registry import KERNELS
    from attnprobe.probe.rundir import write_parquet

    from attnprobe.analyses.experiments.architectures import MatrixSizes, Variant, catalogue, matrix_markdown
    from attnprobe.analyses.conversion.data import training_data
    from attnprobe.analyses.experiments.selection import parse_heads

    heads_table = None
    if from_run is not None:
        if not (Path(from_run) / "heads.parquet").exists():
            raise AttnprobeError(f"{Path(from_run) / 'heads.parquet'} not found: run attnprobe census --out {from_run} first")
        heads_table = pd.read_parquet(Path(from_run) / "heads.parquet")
    names = catalogue(model)
    chosen = []
    if variants:
        wanted = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in names]
        if unknown:
            raise AttnprobeError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(names)}")
        chosen = [names[v] for v in wanted if v != "original"]
    if kernel is not None or heads or layers:
        if kernel not in KERNELS:
            raise AttnprobeError(f"unknown kernel '{kernel}': choose one of {', '.join(KERNELS)}")
        replaced = set(parse_heads(heads, model.info, from_run, seed, None, layers or (None if heads else f"0-{model.info.n_layers - 1}")))
        everyone = {(l, h) for l in range(model.info.n_layers) for h in range(model.info.n_heads)}
        chosen.append(Variant(f"convert-{kernel}", kernel, lambda m, t, keep=everyone - replaced: keep, f"{len(replaced)} heads {kernel}"))
    if not chosen and not control:
        raise AttnprobeError("say what to convert: --variants NAMES, or --kernel K with --heads/--layers (or keep --control)")
    if control:
        chosen.append(control_variant())
    config = ConvertConfig(length=length, batch=batch, accumulation=accumulation, transfer_tokens=parse_tokens(transfer_tokens),
                           tokens=parse_tokens(tokens), transfer_lr=transfer_lr, lr=lr, train=train, lora_rank=lora_rank,
                           ce_weight=ce_weight, checkpoint_every=checkpoint_every, seed=seed)
    from accelerate import PartialState

    state = PartialState()
    config.check(state.num_processes)
    for variant in chosen:  # every kernel and head selection is checked before anything trains
        if variant.kernel:
            make_kernel(variant.kernel, 1, model.info.head_dim)
            variant.keep(model, heads_table)
    steps = config.steps(config.transfer_tokens) + config.steps(config.tokens)
    bar, on_step = progress_bar(console, disable=not state.is_main_process)
    with bar:
        sampling = bar.add_task("training data", total=None, speed="", loss="")
        with state.main_process_first():  # the main process samples and caches; the others read its shards
            training = training_data(model, steps * config.batch * config.length, config.length, data, dataset, seed, epochs,
                                     progress=lambda done, total: bar.update(sampling, completed=done, total=total))
        bar.update(sampling, visible=False)
        sizes = MatrixSizes.quick(census=census) if quick else MatrixSizes(census=census)
        backend = make_backend("native", model)
        table, recall = conversion_matrix(model, backend, chosen, config, training, out, sizes, heads_table, evaluate,
                                          on_step=on_step, recompute_layers=recompute_layers)
    if table is None:
        return None
    write_parquet(out / "matrix.parquet", table)
    write_parquet(out / "recall.parquet", recall)
    (out / "matrix.md").write_text(matrix_markdown(table.drop(columns=["conversion"], errors="ignore")))
    return table
