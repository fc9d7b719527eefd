"""A tiny Llama whose mechanisms are set by hand, so the census has a known right answer.

Residual stream (d_model 128): TOK (dims 0-31) holds the current token one-hot, PREV (32-63) the
previous token (written by the previous-token head), OUT (64-95) what the copy head read, and dim 127 a
planted massive value (1000) on the BOS token only.

- layer 0 head 0: previous-token head. q and k are constant biases on RoPE's fast pairs, arranged so
  the score peaks at relative distance 1; it copies the previous token into PREV.
- layer 1 head 0: induction / copy head. q = current token, k = PREV (the token before each key) on
  RoPE's slow pairs; it attends to the token after an earlier occurrence of the current token and
  copies it into OUT, which the unembedding reads: the model continues repeated text verbatim.
- layer 1 head 2: BOS-sink head. k reads the massive dim, so every query attends to BOS.
Every other head has zero q, k, v and output; MLPs are zero.
"""
from __future__ import annotations

import types

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnprobe.hooks.model import Model, describe

VOCAB, D_MODEL, HEAD_DIM, N_HEADS, N_KV = 32, 128, 64, 4, 2
TOK, PREV, OUT, MASSIVE_DIM = 0, 32, 64, 127
BOS, MASSIVE_VALUE = 1, 1000.0
PREVIOUS_HEAD, COPY_HEAD, SINK_HEAD = (0, 0), (1, 0), (1, 2)
FAST_PAIRS, SLOW_PAIRS = range(0, 8), range(16, 32)  # RoPE pair i rotates at theta^(-i/32) rad per position


class CharTokenizer:
    """Maps characters onto ids 2-31 (0 = pad, 1 = BOS); enough for the census's text handling.

    A token decodes to one letter and that letter encodes back to it, so recall tasks that pick
    tokens from the vocabulary (copying) can run on the planted model."""

    bos_token_id = BOS
    eos_token_id = None
    pad_token_id = 0
    chat_template = None

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos

    vocab_size = VOCAB

    def _id(self, char: str) -> int:
        token = ord(char) - ord("a")
        return token if 2 <= token < VOCAB else 2 + ord(char) % (VOCAB - 2)

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [self._id(c) for c in text]
        if add_special_tokens and self.add_bos:
            ids = [BOS] + ids
        return types.SimpleNamespace(input_ids=ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        # one word per token, so ROUGE-1 on decoded text counts tokens
        return " ".join(chr(ord("a") + int(i)) for i in ids if not (skip_special_tokens and int(i) < 2))

    def get_vocab(self) -> dict:
        return {chr(ord("a") + i): i for i in range(VOCAB)}


def _pair_dims(pair: int) -> tuple[int, int]:
    return pair, pair + HEAD_DIM // 2  # HF's rotate_half layout


def _set_previous_token_head(attn, config, scale: float = 12.0) -> None:
    theta = config.rope_parameters["rope_theta"]
    q_bias = attn.q_proj.bias.view(N_HEADS, HEAD_DIM)
    k_bias = attn.k_proj.bias.view(N_KV, HEAD_DIM)
    head, kv = PREVIOUS_HEAD[1], PREVIOUS_HEAD[1] // (N_HEADS // N_KV)
    for pair in FAST_PAIRS:
        freq = theta ** (-2 * pair / HEAD_DIM)
        a, b = _pair_dims(pair)
        k_bias[kv, a] = scale
        # score(i, j) = scale^2 cos(freq (i - j) - freq): largest at i - j = 1 for every pair
        q_bias[head, a], q_bias[head, b] = scale * torch.cos(torch.tensor(freq)), -scale * torch.sin(torch.tensor(freq))
    v_weight = attn.v_proj.weight.view(N_KV, HEAD_DIM, D_MODEL)
    rms = (1 / D_MODEL) ** 0.5  # RMSNorm turns a one-hot 1 into 1 / rms = 8
    for t in range(VOCAB):
        v_weight[kv, t, TOK + t] = rms
    o_weight = attn.o_proj.weight  # (D_MODEL, N_HEADS * HEAD_DIM)
    for t in range(VOCAB):
        o_weight[PREV + t, head * HEAD_DIM + t] = 1.0


def _set_copy_head(attn, strength: float = 3.0) -> None:
    head, kv = COPY_HEAD[1], COPY_HEAD[1] // (N_HEADS // N_KV)
    slow_dims = [d for pair in SLOW_PAIRS for d in _pair_dims(pair)]
    q_weight = attn.q_proj.weight.view(N_HEADS, HEAD_DIM, D_MODEL)
    k_weight = attn.k_proj.weight.view(N_KV, HEAD_DIM, D_MODEL)
    v_weight = attn.v_proj.weight.view(N_KV, HEAD_DIM, D_MODEL)
    for t, dim in zip(range(VOCAB), slow_dims):
        q_weight[head, dim, TOK + t] = strength
        k_weight[kv, dim, PREV + t] = strength
        v_weight[kv, t, TOK + t] = (1 / D_MODEL) ** 0.5
    for t in range(VOCAB):
        attn.o_proj.weight[OUT + t, head * HEAD_DIM + t] = 1.0


def _set_sink_head(attn, strength: float = 4.0) -> None:
    head, kv = SINK_HEAD[1], SINK_HEAD[1] // (N_HEADS // N_KV)
    a, _ = _pair_dims(SLOW_PAIRS[-1])
    attn.q_proj.bias.view(N_HEADS, HEAD_DIM)[head, a] = strength
    attn.k_proj.weight.view(N_KV, HEAD_DIM, D_MODEL)[kv, a, MASSIVE_DIM] = strength


def planted_model(add_bos: bool = True) -> Model:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=N_HEADS, num_key_value_heads=N_KV, head_dim=HEAD_DIM,
                         max_position_embeddings=4096, rope_theta=1e6, attention_bias=True, tie_word_embeddings=False,
                         bos_token_id=BOS, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.zero_()
        for module in hf.modules():
            if type(module).__name__ == "LlamaRMSNorm":
                module.weight.fill_(1.0)
        embed = hf.model.embed_tokens.weight
        for t in range(VOCAB):
            embed[t, TOK + t] = 1.0
        embed[BOS, MASSIVE_DIM] = MASSIVE_VALUE
        _set_previous_token_head(hf.model.layers[0].self_attn, config)
        _set_copy_head(hf.model.layers[1].self_attn)
        _set_sink_head(hf.model.layers[1].self_attn)
        for t in range(VOCAB):
            hf.lm_head.weight[t, OUT + t] = 10.0
    tokenizer = CharTokenizer(add_bos)
    return Model(hf, tokenizer, describe(hf, tokenizer, "planted", "none", "tests/planted.py"))
