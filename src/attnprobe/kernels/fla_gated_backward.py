"""fla's gated `chunk_bwd_dqkwg` as a chunked torch form, registered through fla's own backend registry for the
calls its Triton kernel refuses.

fla 0.6 raises in `chunk_bwd_dqkwg` whenever a gate is given on Hopper with Triton >= 3.4 and < 3.7.1 (its issue
640), which stops the backward of `chunk_simple_gla` (scalar decay) and `chunk_gated_delta_rule` (Gated DeltaNet)
on such a machine; every other kernel of those backwards has no such guard. This form computes the same four
outputs from the same inputs (per chunk of `chunk_size` tokens: the state h at the chunk's start, the gradient dh
of the state at its end, the chunk-local cumulative log2 gates g), so the rest of the backward stays fla's. It
is registered after fla's TileLang backend, which fla prefers where it is installed, and only accepts the calls
the Triton kernel would refuse. `kernels.fla.trains` still checks the whole backward against our torch form
before a conversion follows it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_registered = False


def chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None, state_v_first=False,
                    cu_seqlens=None, chunk_size=64, chunk_indices=None):
    """dq, dk (B, T, H, K), dw (B, T, HV, K) or None, dg (B, T, HV) fp32 or None, as fla's Triton kernel returns
    them. q, k (B, T, H, K); v = the delta rule's corrected values, do, dv (B, T, HV, V); h, dh (B, NT, HV, K, V)
    ((B, NT, HV, V, K) with `state_v_first`); g (B, T, HV) chunk-local cumulative, log2."""
    if cu_seqlens is not None or g_gamma is not None:
        raise NotImplementedError("attnprobe's chunk_bwd_dqkwg covers fixed-length batches with a per-token gate")
    B, T, H, K = k.shape
    HV = v.shape[2]
    BT = chunk_size
    NT = math.ceil(T / BT)
    scale = K ** -0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)  # fp32 as the Triton kernel accumulates (fp64 stays fp64)

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, d) -> (B, NT, HV, BT, d), zero-padded
        x = x.to(work)
        if x.shape[2] != HV:
            x = x.repeat_interleave(HV // x.shape[2], dim=2)
        x = F.pad(x, (0, 0, 0, 0, 0, NT * BT - T))
        return x.view(B, NT, BT, HV, x.shape[-1]).transpose(2, 3)

    qc, kc, vc, doc = chunks(q), chunks(k), chunks(v), chunks(do)
    hs, dhs = h.to(work), dh.to(work)
    if state_v_first:
        hs, dhs = hs.transpose(-1, -2), dhs.transpose(-1, -2)
    ds = doc @ vc.transpose(-1, -2)  # (B, NT, HV, BT, BT)
    dq = doc @ hs.transpose(-1, -2)  # (B, NT, HV, BT, K)
    dk = vc @ dhs.transpose(-1, -2)
    dw = None
    if w is not None:
        dw = -(chunks(dv) @ hs.transpose(-1, -2))
    dg = None
    positions = torch.arange(NT * BT, device=q.device).view(NT, BT)
    valid = (positions < T)[None, :, None, :]  # (1, NT, 1, BT)
    causal = torch.ones(BT, BT, dtype=torch.bool, device=q.device).tril()
    if g is not None:
        gc = chunks(g[..., None])[..., 0]  # (B, NT, HV, BT)
        last = (torch.clamp(T - positions[:, 0], max=BT) - 1)  # each chunk's last valid row
        g_last = gc.gather(-1, last.view(1, NT, 1, 1).expand(B, NT, HV, 1))  # (B, NT, HV, 1)
        dg_last = (hs * dhs).sum((-1, -2))[..., None] * torch.exp2(g_last)
        dq = dq * torch.exp2(gc)[..., None] * scale
        dk = dk * torch.where(valid, torch.exp2(g_last - gc), 0.0)[..., None]
        dg_last = dg_last + (dk * kc).sum((-1, -2))[..., None]
        mask = causal & valid[..., None] & valid[..., None, :]
        ds = torch.where(mask, ds * torch.exp2(gc[..., :, None] - gc[..., None, :]), 0.0) * scale
        dq = dq + ds @ kc
        dk = dk + ds.transpose(-1, -2) @ qc
        dgc = (dq * qc).sum(-1) - (dk * kc).sum(-1)
        at_last = torch.arange(BT, device=q.device).view(1, 1, 1, BT) == last.view(1, NT, 1, 1)
        dgc = dgc + torch.where(at_last, dg_last, 0.0)
        dg = dgc.transpose(2, 3).reshape(B, NT * BT, HV)[:, :T].contiguous()
    else:
        ds = torch.where(causal, ds, 0.0)
        dq = (dq + ds @ kc) * scale
        dk = dk + (ds.transpose(-1, -2) @ qc) * scale

    def tokens(x: torch.Tensor) -> torch.Tensor:  # (B, NT, HV, BT, d) -> (B, T, HV, d)
        return x.transpose(2, 3).reshape(B, NT * BT, HV, x.shape[-1])[:, :T]

    dq, dk = tokens(dq), tokens(dk)
    if H != HV:
        dq = dq.view(B, T, H, HV // H, K).sum(3)
        dk = dk.view(B, T, H, HV // H, K).sum(3)
    return (dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(),
            None if dw is None else tokens(dw).to(w.dtype).contiguous(), dg)


def triton_refuses(g) -> bool:
    """fla's own condition for raising in the gated chunk_bwd_dqkwg."""
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    return g is not None and IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1


def register() -> None:
    """Add this form to fla's backends for `chunk_bwd_dqkwg` (once; a no-op where fla is missing)."""
    global _registered
    if _registered:
        return
    try:
        import fla.ops.common.chunk_o  # noqa: F401  (creates the 'common' registry and loads fla's own backends)
        from fla.backends import BaseBackend
        from fla.backends import register as fla_register
    except ImportError:
        return

    class AttnprobeTorchBackend(BaseBackend):
        backend_type = "attnprobe_torch"
        priority = 6  # after fla's TileLang backend (5)

        def chunk_bwd_dqkwg_verifier(self, *args, **kwargs):
            g, cu_seqlens, g_gamma = kwargs.get("g"), kwargs.get("cu_seqlens"), kwargs.get("g_gamma")
            if not triton_refuses(g):
                return False, "fla's Triton kernel takes this call"
            if cu_seqlens is not None or g_gamma is not None:
                return False, "attnprobe's torch form covers fixed-length batches with a per-token gate"
            return True, None

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return chunk_bwd_dqkwg(*args, **kwargs)

    fla_register("common")(AttnprobeTorchBackend)
    _registered = True
