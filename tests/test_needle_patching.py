"""Needle patching on a planted copier of three kernels: the heads the answer is read through lose it, no other."""
import pandas as pd
import pytest
import torch

from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.hooks.swap import swap_edits
from attnprobe.probe.census import Census, CensusConfig
from attnprobe.probe.needle_patching import needle_free, patch_drops

from planted import BOS, COPY_HEAD, PREVIOUS_HEAD, planted_model

KERNELS = {"softmax": None, "relu": {}, "deltanet": {"beta": 0.999}}  # copy-head forms (see test_induction_loss)


def planted_sample():
    """[BOS] haystack, the needle (a key token, then the 4-token answer), more haystack, the key again."""
    filler = (torch.randperm(30, generator=torch.Generator().manual_seed(1)) + 2).tolist()
    key, answer, hay = filler[0], filler[1:5], filler[5:]
    prompt = [BOS] + hay[:12] + [key] + answer + hay[12:] + [key]
    return {"prompt_ids": prompt, "needle_span": [13, 18], "answer_span": [14, 18]}, hay


@pytest.mark.parametrize("kernel", KERNELS)
def test_only_the_copy_circuit_needs_the_needle(kernel):
    model = planted_model()
    backend = NativeBackend(model)
    sample, hay = planted_sample()
    edits = [] if KERNELS[kernel] is None else swap_edits(model, kernel, layers=[COPY_HEAD[0]], heads=[COPY_HEAD[1]],
                                                          **KERNELS[kernel])
    with backend.standing_edits(edits):
        clean, drops = patch_drops(backend, sample, needle_free(sample, hay[:5]))
    assert clean > -0.7  # P(answer) > 1/2
    assert drops[COPY_HEAD] > 0.9  # it reads the answer at the needle
    assert drops[PREVIOUS_HEAD] > 0.9  # it writes the keys the copy head finds the needle by
    others = torch.ones_like(drops, dtype=torch.bool)
    others[COPY_HEAD] = others[PREVIOUS_HEAD] = False
    assert drops[others].abs().max() < 1e-3


def test_the_twin_keeps_every_position_and_drops_the_needle():
    sample, hay = planted_sample()
    free = needle_free(sample, hay[:5])
    assert len(free) == len(sample["prompt_ids"])
    assert free[13:18] == hay[:5] and free[:13] == sample["prompt_ids"][:13] and free[18:] == sample["prompt_ids"][18:]


def test_the_census_stage_writes_a_column_and_a_sample_table(tmp_path):
    model = planted_model()
    config = CensusConfig(sink_sequences=4, prose_sequences=1, prose_length=64, lengths=[48], depths=[0.5], needle_patch_samples=1,
                          per_head_patching=True)
    heads = Census(model, NativeBackend(model), config, tmp_path).execute(("needle_patching",))
    table = pd.read_parquet(tmp_path / "needle_patching.parquet")
    assert len(table) == model.info.n_layers * model.info.n_heads
    assert (table["answer_log_probability"] <= 0).all()
    assert heads["needle_patch_drop"].notna().all() and (heads["needle_patch_drop"] <= 1).all()


def test_the_default_census_leaves_the_per_head_passes_out_and_says_so(tmp_path):
    """One pass per head and sample costs minutes on a CPU: the default census names the option instead."""
    model = planted_model()
    config = CensusConfig(sink_sequences=4, prose_sequences=1, prose_length=64, lengths=[48], depths=[0.5],
                          induction_periods=[24], induction_loss_batch=2)
    notes = []
    heads = Census(model, NativeBackend(model), config, tmp_path, note=notes.append).execute(("induction_loss", "needle_patching"))
    assert heads["needle_patch_drop"].isna().all() and heads["induction_loss_share"].isna().all()
    assert sum("--per-head-patching" in note for note in notes) == 2
    assert len(pd.read_parquet(tmp_path / "induction_loss.parquet")) == 1  # the loss drop itself is measured
