"""The library's public entry points refuse bad token ids and arguments with AttnprobeError, one line each."""
from __future__ import annotations

import pytest
import torch

from attnprobe.hooks.backends import make_backend
from attnprobe.errors import AttnprobeError
from attnprobe.probe.head_types import induction_scores
from attnprobe.probe.massive import massive_positions, massive_scan
from attnprobe.probe.patterns import pattern_stats
from attnprobe.probe.secondary import secondary_sinks
from attnprobe.probe.sinks import sink_scan

from test_backends import TinyTokenizer, tiny_llama, wrap

BAD_IDS = {
    "float": (torch.rand(2, 8), "must be integers"),
    "rank 1": (torch.arange(3, 11), "shape \\(batch, tokens\\)"),
    "rank 3": (torch.ones(1, 2, 8, dtype=torch.long), "shape \\(batch, tokens\\)"),
    "no tokens": (torch.zeros(2, 0, dtype=torch.long), "empty"),
    "no rows": (torch.zeros(0, 8, dtype=torch.long), "empty"),
    "too large": (torch.full((1, 8), 100), "token id 100 is outside the vocabulary"),
    "negative": (torch.full((1, 8), -1), "token id -1 is outside the vocabulary"),
    "a list": ([[3, 4, 5]], "must be a torch tensor"),
    "too long": (torch.full((1, 129), 5), "longer than the model's window of 128"),
}

PROBES = {
    "run": lambda backend, ids: backend.run(ids),
    "pattern_stats": lambda backend, ids: pattern_stats(backend, ids),
    "sink_scan": lambda backend, ids: sink_scan(backend, ids),
    "induction_scores": lambda backend, ids: induction_scores(backend, ids, 4),
    "massive_scan": lambda backend, ids: massive_scan(backend, ids, [["x"] * 8] * 2),
    "massive_positions": lambda backend, ids: massive_positions(backend, ids, [0]),
    "secondary_sinks": lambda backend, ids: secondary_sinks(backend, ids, [["x"] * 8] * 2),
}


@pytest.fixture(scope="module")
def backend():
    return make_backend("native", wrap(tiny_llama(), TinyTokenizer()))


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_token_ids_are_refused_by_every_entry_point(backend, probe, case):
    ids, message = BAD_IDS[case]
    with pytest.raises(AttnprobeError, match=message) as error:
        PROBES[probe](backend, ids)
    assert "\n" not in str(error.value)


def test_good_ids_of_any_integer_dtype_still_run(backend):
    ids = torch.randint(3, 100, (2, 8))
    reference = backend.run(ids)
    assert torch.equal(backend.run(ids.int()), reference)


def test_make_backend_refuses_what_is_not_a_model():
    with pytest.raises(AttnprobeError, match="needs a Model"):
        make_backend("native", tiny_llama())
    with pytest.raises(AttnprobeError, match="unknown backend"):
        make_backend("eager", wrap(tiny_llama(), TinyTokenizer()))
