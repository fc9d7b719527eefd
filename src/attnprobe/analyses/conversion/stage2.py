"""Stage 2's step near the hardware: the KL to the teacher without full-vocabulary logits, frozen weights in bf16.

The old path (`FastPath.old()`, kept for the before/after benchmark) ran the teacher and the student to their
logits, (batch x length x vocab) fp32 each (12.9 GB apiece for SmolLM2 at 128 x 512), and kept every weight in
fp32 under autocast. The fast path runs both to their final hidden states (d_model wide) and computes the KL
piece by piece against the shared, frozen LM head (`chunked_distillation`, or liger-kernel's fused linear JSD
at beta 0 on CUDA), with the frozen weights cast to bf16 on CUDA for the duration of the stage (trained
parameters, LoRA and the kernels', stay fp32; autocast still runs their matmuls in bf16). The two paths
differ only by rounding; tests hold the loss and its gradient equal.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from attnprobe.errors import AttnprobeError
from attnprobe.hooks.backends import Backend

LOSSES = ("chunked", "liger", "logits")
HEAD_CHUNK = 4096  # tokens per piece: one piece's (HEAD_CHUNK x vocab) logits exist at a time


@dataclass
class FastPath:
    """How stage 2 runs; the result differs only by rounding, so none of this is part of a checkpoint's recipe."""

    loss: str = "chunked"  # chunked: ours; liger: liger-kernel's fused linear JSD (CUDA); logits: full logits (old)
    bf16_weights: bool = True  # frozen weights in bf16 on CUDA (old: fp32 under autocast)
    fused_ops: bool = True  # liger-kernel's RMSNorm, SwiGLU and RoPE on CUDA where liger-kernel is installed
    compiled_loss: bool = True  # the chunked loss's elementwise work fused by torch.compile on CUDA
    recompute_layers: bool = False  # each decoder layer's activations recomputed in the backward pass

    @classmethod
    def old(cls) -> FastPath:
        return cls(loss="logits", bf16_weights=False, fused_ops=False, compiled_loss=False)

    def check(self, ce_weight: float = 0.0) -> None:
        if self.loss not in LOSSES:
            raise AttnprobeError(f"unknown stage-2 loss '{self.loss}': choose one of {', '.join(LOSSES)}")
        if self.loss == "liger":
            if not _liger_available() or ce_weight:
                raise AttnprobeError("the liger loss needs CUDA, liger-kernel (pip install liger-kernel) and "
                                     "--ce-weight 0: or use --loss chunked")


def _liger_available() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


@contextmanager
def fused_ops(hf: nn.Module, enabled: bool) -> Iterator[bool]:
    """liger-kernel's fused RMSNorm, SwiGLU MLP and RoPE in `hf` for the block (CUDA, liger-kernel installed, a
    model type it knows; else nothing changes); yields whether they are on. Afterwards the model's modules and
    its modeling module are as before: liger binds forwards to instances and swaps names in the module."""
    import importlib
    import sys

    if not enabled or not _liger_available() or next(hf.parameters()).device.type != "cuda":
        yield False
        return
    modeling = sys.modules.get(type(hf).__module__) or importlib.import_module(type(hf).__module__)
    names = dict(vars(modeling))
    bound = {id(m): set(vars(m)) for m in hf.modules()}
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

        known = hf.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN
        if known:
            _apply_liger_kernel_to_instance(hf, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                            fused_linear_cross_entropy=False)
    except Exception as error:  # a liger-kernel that does not fit this transformers: the unfused ops, said once
        sys.stderr.write(f"attnprobe: liger-kernel's fused ops do not apply here ({type(error).__name__}: {error}); "
                         "stage 2 runs without them\n")
        known = False
    try:
        yield known
    finally:
        for module in hf.modules():
            for name in ("forward", "extra_repr", "_get_name"):
                if name in vars(module) and name not in bound.get(id(module), ()):
                    delattr(module, name)
        for name, value in vars(modeling).copy().items():
            if name in names and names[name] is not value:
                setattr(modeling, name, names[name])


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


def _logit_transform(hf: nn.Module) -> str | None:
    """What the model does to its LM head's output beyond the product (the hidden-state path must repeat it)."""
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return name
    return None


def head_of(hf: nn.Module) -> tuple[nn.Module, torch.Tensor, float | None]:
    """(the decoder below the LM head, the LM head's weight, the final logit softcap or None) of a causal LM.
    Refuses a model whose logits are more than head @ hidden (+ softcap): the hidden-state loss would be wrong."""
    transform = _logit_transform(hf)
    if transform not in (None, "final_logit_softcapping"):
        raise AttnprobeError(f"this model scales its logits ({transform}): convert it with --loss logits")
    head = hf.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise AttnprobeError("this model's LM head is not one bias-free linear layer: convert it with --loss logits")
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    return hf.get_decoder(), head.weight, getattr(config, "final_logit_softcapping", None)


def piece_loss_and_grad(z_student, z_teacher, targets, ce_weight: float, softcap, n_tokens: int, n_targets):
    """One piece's share of the loss, sum over its tokens of KL(teacher || student) / n_tokens (+ ce_weight x the
    next-token loss / n_targets), and its gradient for the student's logits before the softcap, in closed form:
    d KL / dz = p_student - p_teacher, d CE / dz = p_student - onehot(target). Only elementwise work and row
    reductions over (piece x vocab), which torch.compile fuses into a few passes."""
    logits = []
    for z in (z_student, z_teacher):
        z = z.float()
        logits.append(softcap * torch.tanh(z / softcap) if softcap else z)
    log_student, log_teacher = (torch.log_softmax(z, dim=-1) for z in logits)
    p_student, p_teacher = log_student.exp(), log_teacher.exp()
    loss = (p_teacher * (log_teacher - log_student)).sum() / n_tokens
    grad = (p_student - p_teacher) / n_tokens
    if ce_weight:
        valid = targets >= 0
        index = targets.clamp_min(0)[:, None]
        loss = loss - ce_weight * (log_student.gather(1, index)[:, 0] * valid).sum() / n_targets
        scale = (ce_weight * valid / n_targets)[:, None]
        grad = (grad + scale * p_student).scatter_add(1, index, -scale)
    if softcap:
        grad = grad * (1 - (logits[0] / softcap) ** 2)
    return loss, grad


_compiled_piece = None


def _piece(compiled: bool, *args):
    """`piece_loss_and_grad(*args)`, compiled once per process where asked (one graph per piece shape); where
    torch.compile fails on a machine, said once, the eager form runs for the rest of the process."""
    global _compiled_piece
    if compiled and _compiled_piece is not False:
        if _compiled_piece is None:
            _compiled_piece = torch.compile(piece_loss_and_grad, dynamic=False)
        try:
            return _compiled_piece(*args)
        except torch._dynamo.exc.TorchDynamoException as error:
            warnings.warn(f"torch.compile failed for stage 2's loss ({str(error).splitlines()[0][:200]}): it runs eagerly")
            _compiled_piece = False
    return piece_loss_and_grad(*args)


class _ChunkedDistillation(torch.autograd.Function):
    """The loss and its gradient for the student's hidden states, both computed piece by piece in the forward pass
    (as liger-kernel's fused linear losses do): the backward only scales the stored gradient."""

    @staticmethod
    def forward(ctx, student, teacher, weight, targets, ce_weight, softcap, chunk, compiled):
        if weight.requires_grad:
            raise AttnprobeError("the chunked loss keeps the LM head frozen: convert with --loss logits to train it")
        total, grad = torch.zeros((), device=student.device), torch.empty_like(student)
        n_targets = (targets >= 0).sum().clamp_min(1)
        # once, not per piece; under autocast the products run in bf16 whatever the operands, so a bf16 head stays
        autocast = torch.is_autocast_enabled(student.device.type)
        head_student, head_teacher = (weight if autocast else weight.to(x.dtype) for x in (student, teacher))
        for start in range(0, len(student), chunk):
            rows = slice(start, start + chunk)
            loss, grad_z = _piece(compiled, student[rows] @ head_student.T, teacher[rows] @ head_teacher.T, targets[rows],
                                  ce_weight, softcap, len(student), n_targets)
            grad[rows] = grad_z.to(student.dtype) @ head_student
            total += loss
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None, None, None, None, None


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """(batch x length,) the next token of each position, -1 (ignored) at each sequence's last."""
    return torch.cat([ids[:, 1:], ids.new_full((len(ids), 1), -1)], dim=1).flatten()


def chunked_distillation(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                         ce_weight: float = 0.0, softcap: float | None = None, chunk: int = HEAD_CHUNK,
                         compiled: bool = False) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the next-token distributions `weight @ hidden` (+ ce_weight x
    next-token loss) from hidden states (batch, length, d): `train.distillation_loss` without its logits.
    `compiled`: each piece's elementwise work through torch.compile (the same numbers up to rounding)."""
    return _ChunkedDistillation.apply(student.flatten(0, 1), teacher.flatten(0, 1), weight, next_token_targets(ids),
                                      float(ce_weight), softcap, chunk, compiled)


def liger_distillation(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The KL alone through liger-kernel's fused linear JSD at beta 0 (forward KL, mean over tokens; CUDA)."""
    from liger_kernel.transformers import LigerFusedLinearJSD

    student, teacher = (x.flatten(0, 1).to(weight.dtype) for x in (student, teacher))  # liger wants one dtype
    return LigerFusedLinearJSD(jsd_beta=0.0)(student, weight, teacher, weight, None)  # None: every position counts


@contextmanager
def frozen_in_bf16(hf: nn.Module, enabled: bool) -> Iterator[None]:
    """The frozen floating-point parameters and buffers of `hf` in bf16 for the block (their fp32 values wait on
    the CPU and come back afterwards, bit for bit); trained parameters stay as they are. Run the model under
    autocast inside (fp32 adapters meet bf16 activations)."""
    if not enabled:
        yield
        return
    saved = []
    for name, tensor in [*hf.named_parameters(), *hf.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.bfloat16 and not tensor.requires_grad \
                and "inv_freq" not in name:  # RoPE frequencies stay fp32, as transformers keeps them
            saved.append((tensor, tensor.data.to("cpu"), tensor.device))
            tensor.data = tensor.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for tensor, original, device in saved:
            tensor.data = original.to(device)


def _adapter_inputs_uncast(module: nn.Module, autocast: bool):
    """Under autocast, peft's cast of each LoRA input to the adapter's fp32 is a copy of the activations that
    autocast undoes for the matmul: off for the block (the same numbers; 8 fewer copies per layer and step)."""
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # a peft before the switch: it casts
        return nullcontext()
    return disable_input_dtype_casting(module, active=autocast)


class Stage2Step:
    """One stage-2 micro-step in its phases, as training runs it and the benchmark times it:
    `teacher(ids)` (no gradient, adapters off), `student(module, ids)` (the replaced heads patched in,
    differentiable forms), `loss(student, teacher, ids)`. Outputs are logits on the old path, else final
    hidden states."""

    def __init__(self, hf: nn.Module, backend, edits, teacher, fast: FastPath, ce_weight: float, autocast) -> None:
        fast.check(ce_weight)
        self.backend, self.edits, self.teacher_model, self.fast, self.ce_weight = backend, edits, teacher, fast, ce_weight
        self.autocast = autocast
        self.hidden = fast.loss != "logits"
        if self.hidden:
            _, self.weight, self.softcap = head_of(hf)

    def teacher(self, ids: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.teacher_model(ids, hidden=self.hidden)

    def student(self, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        from attnprobe.kernels.dispatch import differentiable

        with self.backend.patched(self.edits), differentiable(), self.autocast():  # bf16 weights need autocast
            with _adapter_inputs_uncast(module, torch.is_autocast_enabled(ids.device.type)):
                return module(ids)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if not self.hidden:
            return distillation_loss(student, teacher, ids, self.ce_weight)
        if self.fast.loss == "liger":
            return liger_distillation(student, teacher, self.weight)
        with self.autocast():  # the LM head's products in bf16 on CUDA (accelerate hands the student's output over in fp32)
            return chunked_distillation(student, teacher, self.weight, ids, self.ce_weight, self.softcap,
                                        compiled=self.fast.compiled_loss and student.is_cuda)

    def __call__(self, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        target = self.teacher(ids)
        return self.loss(self.student(module, ids), target, ids)
