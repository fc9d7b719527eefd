"""The gated and delta-rule families in a model: some heads of a GQA layer replaced, the rest softmax;
generation decodes from each head's state exactly as the quadratic form recomputes it."""
from __future__ import annotations

import pytest
import torch

from attnprobe.hooks.reducers import Keep
from attnprobe.hooks.sites import Site
from attnprobe.hooks.swap import kernel_edit
from test_fit_swap import perturbed, random_ids, tiny  # noqa: F401  (tiny is a fixture)

FAMILIES = [("gla", {"chunk": 8}), ("decay", {"data_dependent": True, "chunk": 8}), ("deltanet", {"chunk": 8}),
            ("gated-deltanet", {"chunk": 8}), ("kda", {"chunk": 8}), ("sink+window+gdn", {"window": 4, "sinks": 2, "chunk": 8})]


@pytest.mark.parametrize("name,options", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_mixed_layer_generation_decodes_from_state(tiny, name, options):  # noqa: F811
    model, backend = tiny
    prompt, new = random_ids(1, 13, seed=4), 8
    layers, heads = [0, 1], [0, 3]  # heads 0 and 3 sit on different KV heads; 1 and 2 stay softmax
    kernels = {layer: perturbed(name, len(heads), **options) for layer in layers}
    stateful = [kernel_edit(layer, heads, kernels[layer]) for layer in layers]
    with backend.patched(stateful):
        out = model.hf.generate(prompt, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequence = out.sequences
    assert all(edit.state["length"] == sequence.shape[1] - 1 for edit in stateful)
    reference = backend.run(sequence, edits=[kernel_edit(layer, heads, kernels[layer], recompute=True) for layer in layers])
    torch.testing.assert_close(torch.stack(out.logits, dim=1), reference[:, prompt.shape[1] - 1:-1], atol=1e-4, rtol=1e-4)
    assert (reference - backend.run(sequence)).abs().max() > 1e-3


@pytest.mark.parametrize("name,options", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_census_reads_see_the_replaced_heads_effective_attention(tiny, name, options):  # noqa: F811
    model, backend = tiny
    ids = random_ids(1, 24, seed=5)
    original, swapped = Keep(), Keep()
    backend.run(ids, reads={(1, Site.PATTERN): original})
    with backend.standing_edits([kernel_edit(1, [2], perturbed(name, 1, **options))]):
        backend.run(ids, reads={(1, Site.PATTERN): swapped})
    changed = (original.result() - swapped.result()).abs().amax(dim=(0, 2, 3))
    assert changed[2] > 1e-3 and torch.all(changed[[0, 1, 3]] == 0)
