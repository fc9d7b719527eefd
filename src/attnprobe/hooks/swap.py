"""Replace heads of a loaded model by a kernel in place, and gather the softmax teacher to fit one.

The pretrained W_q, W_k, W_v, W_o, RoPE and GQA grouping stay; only the map from the heads' q, k, v
(after RoPE) to z changes. During generation with a KV cache a replaced head decodes from its own
recurrent state, kept in `edit.state` (prefill stores it, each decode step advances it), instead of
recomputing over the cache; the tokens such a state keeps (a window, a sparse head's cache) are stored
once per KV head, as under GQA the model's own cache does:

    edits = swap_edits(model, "hedgehog", layers=[3, 4])               # fresh kernels, all heads
    edits = swap_edits(model, load_fit("fits/hedgehog"), heads=[0, 2])  # fitted kernels, some heads
    with backend.patched(edits):
        model.hf.generate(ids, max_new_tokens=20)
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from attnprobe.kernels.fit import DEFAULT_STEPS, FitResult, TeacherLayer, fit_kernels
from attnprobe.kernels.registry import make_kernel, select_heads
from attnprobe.kernels.base import TINY, Kernel

from .backends import Backend
from .backends.base import decoder_layers
from .edits import AttentionCall, Edit, head_index, replace_heads
from attnprobe.errors import AttnprobeError
from .model import Model
from .reducers import Keep
from .sites import Site

Heads = Sequence[int] | Mapping[int, Sequence[int]] | None


def pattern_rows(kernel: Kernel, weights: torch.Tensor) -> torch.Tensor:
    """What pattern reads of a replaced head see: its effective attention A, each row divided by its absolute
    sum where the kernel's rows are not normalised (the delta rule's are signed, decays' sum below 1), so
    a probe's threshold (alpha_1 > 0.3, a diagonal > 0.4) is a share of the row's total |weight| for
    every kernel. `pattern_normalisation` names the rule per head."""
    if kernel.normalized:
        return weights
    return weights / weights.abs().sum(-1, keepdim=True).clamp_min(TINY)


def pattern_normalisation(kernel: Kernel | None) -> str:
    """How pattern reads of a head replaced by `kernel` (None: softmax) are normalised."""
    if kernel is None:
        return "softmax (rows sum to 1)"
    return f"{kernel.name} (rows sum to 1)" if kernel.normalized else f"{kernel.name}: A / sum |A| per row"


def kernel_edit(layer: int, heads: Sequence[int], kernel: Kernel, recompute: bool = False) -> Edit:
    """Replace `heads` of `layer` by `kernel` (which covers exactly those heads, in that order).

    recompute=True runs the whole call each time through `kernel.train_forward` (no state, no KV cache): the
    quadratic reference up to 1,024 tokens unless fla's chunked op runs the kernel (CUDA), as training does.
    """
    heads = list(heads)
    if kernel.n_heads != len(heads):
        raise AttnprobeError(f"the {kernel.name} kernel covers {kernel.n_heads} heads, not the {len(heads)} chosen in layer {layer}")

    def head_fn(call: AttentionCall, chosen: list[int], state: dict) -> torch.Tensor:
        group = call.q.shape[1] // call.k.shape[1]
        of_head = tuple(head // group for head in chosen)
        if kernel.kv_heads != of_head:  # the model's GQA grouping: a decode state keeps each KV head's tokens once
            kernel.share_kv(of_head)
        kv_heads = head_index(of_head, call.k.device)
        q, k, v = call.q[:, head_index(chosen, call.q.device)], call.k[:, kv_heads], call.v[:, kv_heads]
        if recompute:
            if call.is_decode:
                raise AttnprobeError("recompute=True needs the whole sequence in each call: generate with use_cache=False")
            z = kernel.train_forward(q, k, v, call.scaling)
        elif not call.is_decode:
            z, state["kernel"] = kernel.prefill(q, k, v, call.scaling)
            state["length"] = k.shape[2]
        else:
            new, past = q.shape[2], call.past
            if state.get("length") != past:
                if call.key_offset:
                    raise AttnprobeError(f"layer {layer}'s kernel state missed part of the sequence and an ArchitectureCache "
                                         "keeps no keys to rebuild it: prefill with the same edits on")
                # the state missed part of the cache (a prefill outside these edits, or a cache the caller
                # built otherwise): rebuild it from the cached keys and values, which alone determine it
                _, state["kernel"] = kernel.prefill(k[:, :, :past], k[:, :, :past], v[:, :, :past], call.scaling)
            z, state["kernel"] = DECODERS[decode_route(kernel, q, v)](kernel, state["kernel"], q, k[:, :, -new:], v[:, :, -new:],
                                                                    call.scaling)
            state["length"] = past + new
        return z.transpose(1, 2)

    def pattern_fn(call: AttentionCall, rows: torch.Tensor) -> torch.Tensor:
        group = call.q.shape[1] // call.k.shape[1]
        kv_heads = [head // group for head in heads]
        offset = call.k.shape[2] - call.q.shape[2]  # query index = position - offset
        q = call.q[:, heads][:, :, (rows - offset).to(call.q.device)]
        return pattern_rows(kernel, kernel.attention_weights(q, call.k[:, kv_heads], call.scaling, rows))

    edit = replace_heads(layer, heads, head_fn)
    edit.label = f"{kernel.name} L{layer} H{heads}"
    edit.pattern_fn = pattern_fn
    edit.kernel = None if recompute else kernel
    return edit


def decode_route(kernel: Kernel, q: torch.Tensor, v: torch.Tensor) -> str:
    """How decode steps of `kernel` run: "triton" (CUDA, a linear kernel our Triton step runs), "fla" (CUDA,
    a gated or delta-rule family flash-linear-attention has a fused recurrent op for), "triton-delta" (CUDA,
    a delta-rule family fla does not run: our fused Triton step), "ring" (one token of a sink + window head
    or a Liger mix of one: the window's slot on the device, kernels/hybrid/ring.py), else "torch"."""
    from attnprobe.kernels import fla
    from attnprobe.kernels.dispatch import use_fla, use_triton
    from attnprobe.kernels.linear import LinearKernel

    from attnprobe.kernels.hybrid.ring import ring_part

    if isinstance(kernel, LinearKernel) and kernel.fits_triton(q, v.shape[-1]):
        return "triton"
    if ring_part(kernel) is not None and q.shape[2] == 1:
        return "ring"
    if use_fla(q) and fla.decode_supported(kernel):
        return "fla"
    if getattr(kernel, "delta_rule", False) and use_triton(q):
        from attnprobe.kernels.deltanet.decode import step_fits

        if step_fits(q.shape[-1]):
            return "triton-delta"
    return "torch"


def fused_decode(kernel, state, q, k, v, scaling):
    """`kernel.decode` through `triton_linear.linear_decode_step`, which advances S and n in place."""
    from attnprobe.kernels import triton_linear
    from attnprobe.kernels.linear import LinearState

    phi_q, phi_k = kernel.features(q, k, scaling)
    s, n = state.s.contiguous(), state.n.contiguous()
    v = v.float()
    steps = [triton_linear.linear_decode_step(phi_q[:, :, t], phi_k[:, :, t], v[:, :, t], s, n) for t in range(q.shape[2])]
    return torch.stack(steps, dim=2).to(q.dtype), LinearState(s, n, state.ref)


def _fla_decode(kernel, state, q, k, v, scaling):
    from attnprobe.kernels import fla

    return fla.decode(kernel, state, q, k, v, scaling)


def _triton_delta_decode(kernel, state, q, k, v, scaling):
    from attnprobe.kernels.deltanet.decode import fused_delta_decode

    return fused_delta_decode(kernel, state, q, k, v, scaling)


def _ring_decode(kernel, state, q, k, v, scaling):
    from attnprobe.kernels.hybrid.mix import MixKernel
    from attnprobe.kernels.hybrid.ring import mix_ring_step, ring_step

    if isinstance(kernel, MixKernel):
        recurrent = DECODERS[decode_route(kernel.recurrent, q, v)]
        return mix_ring_step(kernel, state, q, k, v, scaling, recurrent)
    return ring_step(kernel, state, q, k, v, scaling)


DECODERS = {"triton": fused_decode, "fla": _fla_decode, "triton-delta": _triton_delta_decode, "ring": _ring_decode,
            "torch": lambda kernel, *args: kernel.decode(*args)}


def _heads_for(layer: int, heads: Heads, default: Sequence[int]) -> list[int]:
    if heads is None:
        return list(default)
    if isinstance(heads, Mapping):
        return list(heads.get(layer, default))
    return list(heads)


def swap_edits(model: Model, kernel: str | FitResult, layers: Sequence[int] | None = None, heads: Heads = None,
               recompute: bool = False, **options) -> list[Edit]:
    """Edits replacing `heads` (all, one list for every layer, or per layer) of `layers` by a kernel.

    `kernel` is a name from `kernels.registry.KERNELS` (fresh parameters, `options` passed on) or a
    FitResult, whose layers and heads are the default and bound what may be chosen.
    """
    info = model.info
    fitted = kernel if isinstance(kernel, FitResult) else None
    if fitted is not None and options:
        raise AttnprobeError("options belong to the fit: pass a kernel name to build fresh kernels with options")
    layers = list(layers) if layers is not None else (sorted(fitted.kernels) if fitted else list(range(info.n_layers)))
    edits = []
    for layer in layers:
        if not 0 <= layer < info.n_layers:
            raise AttnprobeError(f"layer {layer} is out of range: this model has layers 0-{info.n_layers - 1}")
        if fitted is not None and layer not in fitted.kernels:
            raise AttnprobeError(f"layer {layer} was not fitted: fitted layers are {sorted(fitted.kernels)}")
        available = fitted.heads[layer] if fitted else list(range(info.n_heads))
        chosen = _heads_for(layer, heads, available)
        missing = [h for h in chosen if h not in available]
        if missing:
            raise AttnprobeError(f"heads {missing} of layer {layer} are not available: choose among {available}")
        if fitted is not None:
            replacement = select_heads(fitted.kernels[layer], [available.index(h) for h in chosen])
        else:
            replacement = make_kernel(kernel, len(chosen), info.head_dim, **options)
        replacement.to(model.device)
        edits.append(kernel_edit(layer, chosen, replacement, recompute))
    return edits


def collect_teacher(backend: Backend, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, TeacherLayer]:
    """One softmax pass over `ids` (B, T) keeping each layer's q, k, v (GQA-repeated) and z, (B, H, T, d)."""
    sites = (Site.Q, Site.K, Site.V, Site.Z)
    reads = {(layer, site): Keep(on_device=True) for layer in layers for site in sites}
    backend.run(ids, reads)
    attention = decoder_layers(backend.model.hf)
    teachers = {}
    for layer in layers:
        q, k, v, z = (reads[(layer, site)].result() for site in sites)
        group = q.shape[1] // k.shape[1]
        module = attention[layer].self_attn
        scaling = float(getattr(module, "scaling", q.shape[-1] ** -0.5))
        teachers[layer] = TeacherLayer(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), z.transpose(1, 2).contiguous(), scaling)
    return teachers


def fit_heads(backend: Backend, ids: torch.Tensor, kernel: str, layers: Sequence[int], heads: Heads = None,
              steps: int = DEFAULT_STEPS, progress: bool = False, **options) -> FitResult:
    """Collect the teacher over `ids` in one pass and fit `kernel` to the chosen heads of `layers`."""
    chosen = {layer: _heads_for(layer, heads, range(backend.info.n_heads)) for layer in layers}
    bad = sorted({h for hs in chosen.values() for h in hs if not 0 <= h < backend.info.n_heads})
    if bad:
        raise AttnprobeError(f"heads {bad} are out of range: this model has heads 0-{backend.info.n_heads - 1}")
    teachers = collect_teacher(backend, ids, layers)
    return fit_kernels(kernel, teachers, chosen, steps=steps, progress=progress, **options)
