"""Tiny random models built from a config, no download: a GQA Llama and a Gemma-3 with sliding layers
(`wrap` makes them a Model), and a tiny Llama saved as a local HF directory with a real (small,
trained) BPE tokenizer, so the CLI can be driven end to end the way a user drives it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from attnprobe.hooks.model import Model, describe
from attnprobe.probe import texts
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


class TinyTokenizer:
    """All `describe` needs: a BOS id and `__call__(text).input_ids`."""

    bos_token_id = 1

    def __call__(self, text):
        return type("Encoding", (), {"input_ids": [1] + [3 + ord(c) % 90 for c in text]})()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Gemma3ForCausalLM(config).eval()


def wrap(hf, tokenizer) -> Model:
    return Model(hf, tokenizer, describe(hf, tokenizer, "test", "none", "test"))


def tiny_model_dir(root: Path, layers: int = 2, vocab: int = 400, max_positions: int = 2048) -> Path:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([texts.prose()[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    path = Path(root) / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


CLI = [sys.executable, "-m", "attnprobe.analyses.cli"]


def attnprobe(*args, cwd=None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the attnprobe CLI in a fresh interpreter, as a user would; arguments may be paths or numbers."""
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout)
