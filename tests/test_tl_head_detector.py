"""Cross-check on the real SmolLM2: our previous-token and induction scores against TransformerLens's own
head detector (`transformer_lens.head_detector.detect_head`), run on the same tokens.

TransformerLens's "mul" score divides the detected attention mass by the mass of *all* T rows, while
ours averages over the rows where the pattern can occur (T - 1 rows for previous-token, the S rows of
the second copy for induction). On a repeated random string of length S (T = 2S, no BOS) the two are
therefore related exactly: TL_prev = ours_prev * (T - 1) / T and TL_induction = ours_induction / 2.
"""
import types

import pytest
import torch

from attnprobe.hooks.model import load_model
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.backends.transformer_lens import TransformerLensBackend
from attnprobe.probe.head_types import induction_scores, repeated_random_tokens
from attnprobe.probe.patterns import diagonal_by_layer, pattern_stats

pytestmark = pytest.mark.real_model
TOLERANCE = 1e-4  # absolute, on scores in [0, 1]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_previous_token_and_induction_scores_match_transformer_lens(smollm2):
    from transformer_lens.head_detector import detect_head

    length = 50
    tokens = repeated_random_tokens(smollm2.hf.config.vocab_size, length, batch=1, seed=3)
    total = tokens.shape[1]
    native = NativeBackend(smollm2)
    induction, _ = induction_scores(native, tokens, length)
    previous = diagonal_by_layer(pattern_stats(native, tokens, diagonals=(1,)), 1)
    native.close()

    tl = TransformerLensBackend(smollm2)
    try:
        _, cache = tl.bridge.run_with_cache(tokens)
        cache = {("pattern", layer, "attn"): cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(smollm2.info.n_layers)}
        shim = types.SimpleNamespace(cfg=types.SimpleNamespace(device="cpu", n_ctx=smollm2.info.max_context, dtype=torch.float32,
                                                               n_layers=smollm2.info.n_layers, n_heads=smollm2.info.n_heads),
                                     to_tokens=lambda seq: tokens)
        lookup = type("Cache", (), {"__getitem__": lambda self, key: cache[key]})()
        tl_previous = detect_head(shim, "unused", "previous_token_head", cache=lookup)
        tl_induction = detect_head(shim, "unused", "induction_head", cache=lookup)
    finally:
        tl.close()
    assert torch.allclose(tl_previous, previous * (total - 1) / total, atol=TOLERANCE)
    assert torch.allclose(tl_induction, induction / 2, atol=TOLERANCE)
    assert induction.max() > 0.5  # the check is not vacuous: SmolLM2 has strong induction heads
