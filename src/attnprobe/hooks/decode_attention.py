"""The original model decoding over a transformers StaticCache, with its softmax decode step either transformers'
SDPA or the bandwidth-bound split-K kernel (the strong baseline a replacement is measured against).

    with static_attention(model, "split-k"):   # the model's own attention modules and weights
        model.hf(input_ids=token, cache=static_cache, position_ids=position)

Registers attention functions with transformers' AttentionInterface (and their masks with its
AttentionMaskInterface) and switches the model to one for the block. Both prefill the same way: a prefill from
position 0 runs SDPA causal over the call's own keys (FlashAttention-class; no mask over the whole buffer,
which at 128K tokens would be a 16 GB boolean). A decode step (one query per sequence):
  - "sdpa": transformers' own `sdpa_attention_forward` with its mask over the buffer (what the model does);
  - "split-k": kernels/softmax/decode.py over the buffers, valid up to `position_ids + 1`, a GPU tensor: no
    host sync and no mask, so a CUDA graph replays the step as the cache grows.
A StaticCache's buffers hold position p at index p, which both read.
"""
from __future__ import annotations

from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attnprobe.errors import AttnprobeError
from attnprobe.kernels.softmax.decode import split_k_decode

from .model import Model


def _positions(kwargs):
    positions = kwargs.get("position_ids")
    if positions is None:
        raise AttnprobeError("a static decode reads the step's position: call the model with position_ids")
    return positions


def _prefill(module, query, key, value, scaling, dropout, positions):
    if int(positions[0, 0]) != 0:  # a prefill is not captured: one host read per layer costs nothing here
        raise AttnprobeError("a static cache is prefilled from position 0 only: start a fresh cache")
    length = query.shape[2]
    return sdpa_attention_forward(module, query, key[:, :, :length], value[:, :, :length], None, dropout=dropout,
                                  scaling=scaling, is_causal=True)


def split_k_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature; returns (B, T, H, d) and no weights."""
    positions = _positions(kwargs)
    scaling = module.scaling if scaling is None else scaling
    if query.shape[2] > 1:
        return _prefill(module, query, key, value, scaling, dropout, positions)
    return split_k_decode(query, key, value, positions[:, -1] + 1, scaling).transpose(1, 2), None


def static_sdpa_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    positions = _positions(kwargs)
    if query.shape[2] > 1:
        return _prefill(module, query, key, value, module.scaling if scaling is None else scaling, dropout, positions)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _no_mask(*args, **kwargs):
    return None


def _decode_mask(*args, q_length: int, **kwargs):
    """transformers' SDPA mask for a decode step; none for a prefill (it runs causal over its own keys)."""
    return None if q_length > 1 else sdpa_mask(*args, q_length=q_length, **kwargs)


# decode -> (registered name, attention function, mask function)
IMPLEMENTATIONS = {"sdpa": ("attnprobe_static_sdpa", static_sdpa_forward, _decode_mask),
                   "split-k": ("attnprobe_split_k", split_k_forward, _no_mask)}


@contextmanager
def static_attention(model: Model, decode: str):
    """Within the block the model's softmax prefills causally over its own keys and decodes with `decode`
    ("sdpa" or "split-k") over a StaticCache (see the module's note)."""
    if decode not in IMPLEMENTATIONS:
        raise AttnprobeError(f"unknown decode attention {decode!r}: choose among {', '.join(IMPLEMENTATIONS)}")
    name, forward, mask = IMPLEMENTATIONS[decode]
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, mask)
    previous = model.hf.config._attn_implementation
    model.hf.set_attn_implementation(name)
    try:
        yield
    finally:
        model.hf.set_attn_implementation(previous)
