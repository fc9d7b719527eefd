"""flash-linear-attention's Triton ops as the CUDA prefill (chunked) and decode (fused recurrent) of the gated
and delta-rule families.

Our tensors are (B, H, T, d); fla's are (B, T, H, d). Every call passes scale = 1 (our kernels scale
their features themselves) and asks for the final state, (B, H, d_k, d_v) as ours. Chosen by
`dispatch.use_fla`; fla's ops are autograd functions, so training on CUDA goes through them too.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from .dispatch import torch_forms
from .fla_gated_backward import register as register_gated_backward

BACKWARD_TOLERANCE = 0.02  # relative RMS error of fla's input gradients against our fp32 torch form's
backward_errors: dict[tuple, float] = {}  # (family, op, device, dtype) -> that error, inf where fla raised


def _fla(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.transpose(1, 2).to(dtype).contiguous()


def prefill(op: str, phi_q, phi_k, values, log_alpha, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention: op "gla" (per-channel log gates (B, H, T, d)) or "simple_gla" (scalar: the
    gates' first channel). Returns o (B, H, T, d_v) fp32 and the final state fp32."""
    register_gated_backward()
    q, k, v = _fla(phi_q, dtype), _fla(phi_k, dtype), _fla(values, dtype)
    if op == "gla":
        from fla.ops.gla import chunk_gla

        o, state = chunk_gla(q, k, v, g=_fla(log_alpha, torch.float32), scale=1.0, output_final_state=True)
    else:
        from fla.ops.simple_gla import chunk_simple_gla

        o, state = chunk_simple_gla(q, k, v, g=log_alpha[..., 0].transpose(1, 2).float().contiguous(), scale=1.0,
                                    output_final_state=True)
    return o.transpose(1, 2).float(), state.float()


def delta_prefill(q, k, v, beta, log_alpha, gate, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule on L2-normalised q, k; gate None, "head" (log a (B, H, T, 1)) or "channel" (KDA,
    log a (B, H, T, d)). Returns o (B, H, T, d_v) and the final state, fp32."""
    register_gated_backward()
    qf, kf, vf = _fla(q, dtype), _fla(k, dtype), _fla(v, dtype)
    betaf = beta.transpose(1, 2).to(dtype).contiguous()
    if gate is None:
        from fla.ops.delta_rule import chunk_delta_rule

        o, state = chunk_delta_rule(qf, kf, vf, betaf, scale=1.0, output_final_state=True)
    elif gate == "head":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        o, state = chunk_gated_delta_rule(qf, kf, vf, log_alpha[..., 0].transpose(1, 2).float().contiguous(), betaf,
                                          scale=1.0, output_final_state=True)
    else:
        from fla.ops.kda import chunk_kda

        o, state = chunk_kda(qf, kf, vf, _fla(log_alpha, torch.float32), betaf, scale=1.0, output_final_state=True)
    return o.transpose(1, 2).float(), state.float()


def decode_supported(kernel) -> bool:
    """Whether fla has a fused recurrent op for `kernel`'s family: GLA, simple GLA (decay), the delta rule
    and the gated delta rule (KDA's per-channel gate stays on the torch step)."""
    if getattr(kernel, "delta_rule", False):  # duck-typed: the families import this module, not the reverse
        return kernel.gate in (None, "head")
    return getattr(kernel, "fla_op", None) in ("gla", "simple_gla")


def decode(kernel, state, q, k, v, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernel.decode` (q, k, v (B, H, n, d), the state from its prefill) through fla's fused recurrent op:
    one launch for all n new tokens. Inputs in fp32 (a few tokens: precision is free)."""
    dtype = q.dtype
    state = state.float().contiguous()
    if getattr(kernel, "delta_rule", False):
        qn, kn, values, beta, log_alpha = kernel._inputs(q, k, v)
        qf, kf, vf = (_fla(x, torch.float32) for x in (qn, kn, values))
        betaf = beta.transpose(1, 2).float().contiguous()
        if kernel.gate is None:
            from fla.ops.delta_rule import fused_recurrent_delta_rule

            o, state = fused_recurrent_delta_rule(qf, kf, vf, betaf, scale=1.0, initial_state=state, output_final_state=True)
        else:
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

            o, state = fused_recurrent_gated_delta_rule(qf, kf, vf, g=log_alpha[..., 0].transpose(1, 2).float().contiguous(),
                                                        beta=betaf, scale=1.0, initial_state=state, output_final_state=True)
        return o.transpose(1, 2).to(dtype), state.float()
    phi_q, phi_k, values, log_alpha = kernel._inputs(q, k, v, scaling)
    qf, kf, vf = (_fla(x, torch.float32) for x in (phi_q, phi_k, values))
    if kernel.fla_op == "gla":
        from fla.ops.gla import fused_recurrent_gla

        o, state = fused_recurrent_gla(qf, kf, vf, gk=_fla(log_alpha, torch.float32), scale=1.0, initial_state=state,
                                       output_final_state=True)
    else:
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        o, state = fused_recurrent_simple_gla(qf, kf, vf, g=log_alpha[..., 0].transpose(1, 2).float().contiguous(), scale=1.0,
                                              initial_state=state, output_final_state=True)
    return kernel._output(o.transpose(1, 2).float()).to(dtype), state.float()


def trains(kernel, like: torch.Tensor) -> bool:
    """Whether fla's backward for `kernel`'s op may train on tensors like `like`: checked once per op, device and
    dtype against our torch form on random inputs. fla 0.6 refuses its gated chunk backward (scalar decay, Gated
    DeltaNet) on Hopper with Triton 3.4-3.7.0 (its issue 640; `fla_gated_backward` supplies the refused piece), and
    wrong gradients have been reported for other
    (op, GPU, Triton) combinations; a conversion must not follow a refused or wrong gradient."""
    key = (kernel.name, getattr(kernel, "fla_op", None), getattr(kernel, "gate", None), str(like.device), like.dtype)
    if key not in backward_errors:
        # a graph of its own: no autocast, and outside any enclosing activation checkpoint (whose recomputation,
        # finding the answer cached, would save fewer tensors than the first forward did)
        with torch.enable_grad(), torch.autocast(like.device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
            backward_errors[key] = backward_error(kernel, like.device, like.dtype)
    return backward_errors[key] <= BACKWARD_TOLERANCE


def backward_error(kernel, device, dtype, length: int = 256) -> float:
    """max over q, k, v of ||grad_fla - grad_torch|| / ||grad_torch|| for one random (1, H, length, d) input and output
    gradient; the torch form runs in fp32 on the same (dtype-rounded) inputs. inf where fla raises."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (1, kernel.n_heads, length, kernel.head_dim)
    inputs = [torch.randn(shape, generator=generator, device=device).to(dtype) for _ in range(3)]
    upstream = torch.randn(shape, generator=generator, device=device)
    grads = []
    for reference in (False, True):
        leaves = [(x.float() if reference else x).detach().requires_grad_() for x in inputs]
        try:
            with torch_forms() if reference else nullcontext():
                z = kernel.prefill(*leaves, kernel.head_dim ** -0.5)[0]
            grads.append(torch.autograd.grad(z.float(), leaves, upstream))
        except RuntimeError:
            if reference:
                raise
            return math.inf
    return max(float((g.float() - r).norm() / r.norm().clamp_min(1e-30))
               for g, r in zip(*grads))
