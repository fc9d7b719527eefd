"""Shared fixtures: tiny random models from a config (tests/tiny_hf.py), each test its own fresh copy."""
from __future__ import annotations

import pytest

from tiny_hf import TinyTokenizer, tiny_gemma3, tiny_llama, tiny_model_dir, wrap


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A saved tiny model directory (safetensors + tokenizer) for CLI and loading tests, one per test module."""
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def tiny_llama_model():
    """A 3-layer GQA Llama (4 query heads, 2 KV heads, head dim 16) as a Model; EOS off for generation."""
    hf = tiny_llama()
    hf.generation_config.eos_token_id = None
    return wrap(hf, TinyTokenizer())


@pytest.fixture
def tiny_gemma3_model():
    """A 3-layer Gemma-3 (sliding window 4 on layers 0 and 2) as a Model; EOS off for generation."""
    hf = tiny_gemma3()
    hf.generation_config.eos_token_id = None
    return wrap(hf, TinyTokenizer())
