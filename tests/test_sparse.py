"""The sparse rules: chunked prefill, quadratic form, decode steps and effective attention held equal to
the per-query references written from the papers (kernels/sparse/naive.py)."""
import pytest
import torch
from attnprobe.errors import AttnprobeError
from attnprobe.kernels.registry import make_kernel
from attnprobe.kernels.sparse import naive

B, H, T, D = 1, 2, 37, 8
SCALING = D ** -0.5
RULES = {
    "oracle-topk": {"k": 5, "sinks": 2},
    "quest": {"page": 4, "pages": 3},
    "vertical-slash": {"vertical": 6, "slash": 5, "last": 7, "sinks": 2, "local": 3},
    "power": {"block": 3, "window": 4, "sinks": 2},
}


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=generator) for _ in range(3)]


def reference(rule, q, k, v, decode):
    return torch.stack([naive.sparse_attention(rule, q[0, h], k[0, h], v[0, h], SCALING, decode, **RULES[rule])
                        for h in range(H)])[None]


@pytest.mark.parametrize("rule", RULES)
def test_prefill_and_quadratic_equal_the_reference(rule):
    q, k, v = inputs()
    kernel = make_kernel(rule, H, D, chunk=8, **RULES[rule])
    expected = reference(rule, q, k, v, decode=False)
    torch.testing.assert_close(kernel.quadratic(q, k, v, SCALING), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel.prefill(q, k, v, SCALING)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_decode_steps_equal_the_reference(rule):
    q, k, v = inputs(1)
    kernel = make_kernel(rule, H, D, chunk=8, **RULES[rule])
    start = 10
    _, state = kernel.prefill(q[:, :, :start], k[:, :, :start], v[:, :, :start], SCALING)
    decoded, _ = kernel.decode(state, q[:, :, start:], k[:, :, start:], v[:, :, start:], SCALING)
    torch.testing.assert_close(decoded, reference(rule, q, k, v, decode=True)[:, :, start:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", RULES)
def test_effective_attention_reproduces_the_output(rule):
    q, k, v = inputs(2)
    kernel = make_kernel(rule, H, D, **RULES[rule])
    weights = kernel.attention_weights(q, k, SCALING, torch.arange(T))
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))
    torch.testing.assert_close(weights @ v, kernel.quadratic(q, k, v, SCALING), atol=1e-5, rtol=1e-5)


def test_rules_keep_fewer_keys_than_dense_and_oracle_keeps_its_budget():
    q, k, _ = inputs(3)
    rows = torch.arange(T)
    for rule, options in RULES.items():
        kept = make_kernel(rule, H, D, **options).keep_rows(q, k, SCALING, rows, decode=rule == "quest").sum(-1)
        assert (kept <= rows + 1).all() and (kept[..., -1] < T).all(), rule
    kept = make_kernel("oracle-topk", H, D, k=5, sinks=2).keep_rows(q, k, SCALING, rows).sum(-1)
    assert (kept[..., 7:] == 7).all() and (kept[..., :7] == rows[:7] + 1).all()


def test_quest_prefill_is_dense_and_oracle_is_exact_at_full_budget():
    q, k, v = inputs(4)
    dense = make_kernel("softmax", H, D).quadratic(q, k, v, SCALING)
    torch.testing.assert_close(make_kernel("quest", H, D, page=4, pages=2).prefill(q, k, v, SCALING)[0], dense)
    torch.testing.assert_close(make_kernel("oracle-topk", H, D, k=T, sinks=0).prefill(q, k, v, SCALING)[0], dense, atol=1e-6, rtol=1e-5)


def test_sparse_families_report_what_they_keep():
    kernel = make_kernel("oracle-topk", H, D)
    assert kernel.cached_tokens is None and not kernel.learnable and kernel.state_numbers(D) == 0
    with pytest.raises(AttnprobeError, match="no option"):
        make_kernel("quest", H, D, window=3)


def reference_sets(rule, q, k, decode):
    """Per head and query, the keys the paper's per-query reference keeps (naive.py)."""
    options, sets = RULES[rule], []
    for h in range(H):
        pattern = None
        if rule == "vertical-slash" and not decode:
            pattern = naive.vertical_slash_pattern(q[0, h], k[0, h], SCALING, **{n: options[n] for n in
                                                   ("vertical", "slash", "last", "sinks", "local")})
        row = []
        for i in range(T):
            if rule == "oracle-topk":
                row.append(naive.topk_keys(q[0, h, i], k[0, h], i, options["k"], options["sinks"]))
            elif rule == "quest":
                row.append(naive.quest_keys(q[0, h, i], k[0, h], i, options["page"], options["pages"]))
            elif rule == "vertical-slash":
                row.append({j for j in range(i + 1) if j in pattern[0] or i - j in pattern[1]})
            else:
                row.append(naive.power_keys(i, options["block"], options["window"], options["sinks"]))
        sets.append(row)
    return sets


@pytest.mark.parametrize("rule", RULES)
def test_each_query_keeps_the_references_keys_and_the_needle(rule):
    """A needle: key 9 aligned with a direction the last 8 queries share, so they attend to it most. Each
    rule keeps, query by query, exactly the keys its reference keeps; the rules that select by score
    (oracle top-k, Quest's page bound, MInference's columns) keep the needle for every late query and
    their output there is the needle's value; the static PowerAttention drops it where its pattern says."""
    q, k, v = inputs(5)
    shared = torch.randn(D, generator=torch.Generator().manual_seed(9))
    needle = 9
    q[:, :, -8:] += 3 * shared
    k[:, :, needle] = 3 * shared
    decode = rule == "quest"
    kernel = make_kernel(rule, H, D, chunk=8, **RULES[rule])
    kept = kernel.keep_rows(q, k, SCALING, torch.arange(T), decode=decode, context=None if decode else kernel.context(q, k, SCALING))
    expected = reference_sets(rule, q, k, decode)
    for h in range(H):
        assert [set(torch.nonzero(kept[0, h, i]).flatten().tolist()) for i in range(T)] == expected[h], (rule, h)
    late = kept[0, :, -8:, needle]
    if rule == "power":  # blocks 12 and 3 are 9 blocks apart, not a power of two: the last query never sees it
        assert not late[:, -1].any()
    else:
        assert late.all(), rule
        z = kernel.quadratic(q, k, v, SCALING) if not decode else reference(rule, q, k, v, decode=True)
        assert torch.allclose(z[0, :, -1], v[0, :, needle], atol=0.05)
