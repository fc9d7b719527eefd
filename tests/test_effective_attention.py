"""A replaced head's effective attention: weights @ v is the kernel's own output, and census reads see it."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnprobe.hooks.model import Model, describe
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site
from attnprobe.hooks.swap import swap_edits
from attnprobe.kernels.registry import KERNELS, make_kernel


@pytest.mark.parametrize("name", KERNELS)
def test_weights_times_values_is_the_kernel_output(name):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    options = {"window": 8} if "window" in name else {}
    kernel = make_kernel(name, 3, 16, **options)
    rows = torch.arange(40)
    weights = kernel.attention_weights(q, k, 0.25, rows)
    if kernel.normalized:  # the delta rule's rows need not sum to 1 (nor stay >= 0)
        assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 40), atol=1e-5)
    assert torch.all(weights.triu(1) == 0)  # causal
    assert torch.allclose(weights @ v, kernel.quadratic(q, k, v, 0.25), atol=1e-4)


class _Tok:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return type("E", (), {"input_ids": [5]})()


def _tiny():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = LlamaForCausalLM(config).eval()
    return Model(hf, _Tok(), describe(hf, _Tok(), "tiny", "none", "test"))


def test_pattern_reads_of_a_swapped_model_show_the_kernel():
    model = _tiny()
    backend = NativeBackend(model)
    ids = torch.randint(0, 64, (1, 30))
    original, softmax_swap, elu_swap = Keep(), Keep(), Keep()
    backend.run(ids, reads={(1, Site.PATTERN): original})
    backend.run(ids, reads={(1, Site.PATTERN): softmax_swap}, edits=swap_edits(model, "softmax", layers=[1]))
    with backend.standing_edits(swap_edits(model, "elu", layers=[1], heads=[2])):
        backend.run(ids, reads={(1, Site.PATTERN): elu_swap})
    assert torch.allclose(original.result(), softmax_swap.result(), atol=1e-6)
    changed = (original.result() - elu_swap.result()).abs().amax(dim=(0, 2, 3))
    assert changed[2] > 1e-3 and torch.all(changed[[0, 1, 3]] == 0)


def test_retrieval_census_of_a_swapped_model_prefills_under_the_edits(monkeypatch):
    """A shared softmax prefix (plain HF prefill) is used only for an unedited model."""
    from attnprobe.probe import retrieval
    from planted import planted_model

    built = []
    original = retrieval.SharedPrefix

    class Recording(original):
        def __init__(self, model):
            built.append(model)
            super().__init__(model)

    monkeypatch.setattr(retrieval, "SharedPrefix", Recording)
    model = planted_model()
    backend = NativeBackend(model)
    needles = [{"needle": "kq zv", "question": "?", "answer": "zv"}]
    with backend.standing_edits(swap_edits(model, "elu", layers=[0, 1])):
        retrieval.retrieval_census(model, backend, lengths=[64], depths=[0.5], needles=needles, max_new_tokens=3)
    assert built == []
    retrieval.retrieval_census(model, backend, lengths=[64], depths=[0.5], needles=needles, max_new_tokens=3)
    assert len(built) == 1


@pytest.mark.parametrize("name", KERNELS)
def test_pattern_reads_of_every_kernel_are_its_own_output(name):
    """Through the model: the effective attention A of a replaced head times v is the head's own output z
    (its kernel's prefill), and a pattern read shows A, divided by each row's absolute sum where the
    kernel's rows are not normalised (`pattern_rows`, stated per head by `pattern_normalisation`)."""
    from attnprobe.hooks.swap import pattern_rows

    model = _tiny()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    reads = {(1, site): Keep() for site in (Site.PATTERN, Site.Q, Site.K, Site.V, Site.Z)}
    edits = swap_edits(model, name, layers=[1], heads=[0, 2], **({"window": 8} if "window" in name else {}))
    NativeBackend(model).run(ids, reads=reads, edits=edits)
    pattern, q, k, v, z = (reads[(1, site)].result() for site in (Site.PATTERN, Site.Q, Site.K, Site.V, Site.Z))
    kernel, heads = edits[0].kernel, [0, 2]
    k, v = k.repeat_interleave(2, dim=1)[:, heads], v.repeat_interleave(2, dim=1)[:, heads]
    weights = kernel.attention_weights(q[:, heads], k, model.info.head_dim ** -0.5, torch.arange(40))
    assert torch.allclose(weights @ v, z[:, :, heads].transpose(1, 2), atol=1e-4)
    assert torch.allclose(pattern[:, heads], pattern_rows(kernel, weights), atol=1e-5)
    if not kernel.normalized:
        assert torch.allclose(pattern[:, heads].abs().sum(-1), torch.ones(2, 2, 40), atol=1e-5)


def test_a_delta_rule_heads_scores_state_their_normalisation(tmp_path):
    from attnprobe.probe.census import Census, CensusConfig
    from planted import planted_model

    model = planted_model()
    backend = NativeBackend(model)
    with backend.standing_edits(swap_edits(model, "deltanet", layers=[1], heads=[0])):
        heads = Census(model, backend, CensusConfig(sink_sequences=4, sink_length=32, prose_sequences=1, prose_length=64),
                       tmp_path).execute(("sinks",))
    rule = heads.set_index(["layer", "head"])["pattern_normalisation"]
    assert rule[(1, 0)] == "deltanet: A / sum |A| per row"
    assert set(rule.drop((1, 0))) == {"softmax (rows sum to 1)"}
