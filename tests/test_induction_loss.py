"""The behavioural induction probe on planted copiers of three kernels: softmax, linear (relu) and the delta rule."""
import pandas as pd
import pytest
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.edits import zero_heads
from attnprobe.hooks.swap import swap_edits
from attnprobe.probe.census import Census, CensusConfig
from attnprobe.probe.induction_loss import copy_losses, repeated_tokens

from planted import BOS, COPY_HEAD, PREVIOUS_HEAD, VOCAB, planted_model

# the copy head in each kernel's form: relu features of one-hot q and k match only the same token, and
# the delta rule stores each distinct token's value under its own orthogonal key
KERNELS = {"softmax": None, "relu": {}, "deltanet": {"beta": 0.999}}
SMALL = dict(sink_sequences=4, prose_sequences=1, prose_length=64, induction_periods=[24, 12], induction_loss_batch=4,
             per_head_patching=True)


def with_copy_head(model, kernel):
    if KERNELS[kernel] is None:
        return []
    return swap_edits(model, kernel, layers=[COPY_HEAD[0]], heads=[COPY_HEAD[1]], **KERNELS[kernel])


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_planted_copier_drops_the_loss_on_the_repeat_and_needs_its_circuit(kernel, tmp_path):
    model = planted_model()
    backend = NativeBackend(model)
    with backend.standing_edits(with_copy_head(model, kernel)):
        heads = Census(model, backend, CensusConfig(**SMALL), tmp_path).execute(("induction_loss",))
    table = pd.read_parquet(tmp_path / "induction_loss.parquet").set_index("period")
    assert list(table.index) == [24, 12]
    # the first copy is random (about log 31 nats per token), the repeat is copied
    assert (table["loss_first_copy"] > 2.5).all() and (table["loss_second_copy"] < 0.5).all()
    share = heads.set_index(["layer", "head"])["induction_loss_share"]
    assert share[COPY_HEAD] > 0.9
    # the copy head's keys come from the previous-token head: without it a softmax copy head attends evenly to
    # the tokens it has seen (part of the gain stays), a relu head's all-zero keys give no output at all
    assert share[PREVIOUS_HEAD] > 0.1
    assert share.drop([COPY_HEAD, PREVIOUS_HEAD]).abs().max() < 0.01
    roles = {(r.layer, r.head) for r in heads.itertuples() if "induction_loss" in r.roles.split(",")}
    assert roles - {PREVIOUS_HEAD} == {COPY_HEAD}


def test_without_the_copy_head_the_repeat_is_no_easier():
    """A model with the copy head zeroed predicts the repeat no better than the random first copy."""
    model = planted_model()
    backend = NativeBackend(model)
    ids = repeated_tokens(VOCAB, 20, 4, 0, BOS)
    first, second = copy_losses(backend, ids, 20)
    first_off, second_off = copy_losses(backend, ids, 20, [zero_heads(*COPY_HEAD)])
    assert first - second > 2.0
    assert abs(first_off - second_off) < 0.05


def test_periods_the_window_cannot_hold_twice_are_left_out_with_a_note(tmp_path):
    model = planted_model()
    model.info.max_context = 90
    config = CensusConfig(**{**SMALL, "sink_length": 16, "prose_length": 16, "lengths": [16], "massive_length": 16, "induction_periods": [50, 12]})
    census = Census(model, NativeBackend(model), config, tmp_path)
    census.execute(("induction_loss",))
    assert list(pd.read_parquet(tmp_path / "induction_loss.parquet")["period"]) == [12]
    assert any("periods [50]" in note for note in census.notes)
