"""The matrix's evaluation: what text each step reads, one BOS convention, one perplexity, and a
retrieval column that says when it is undefined."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from attnprobe.analyses.experiments import architectures
from attnprobe.analyses.experiments.architectures import MatrixSizes, Variant, evaluate_variant
from attnprobe.hooks.backends.native import NativeBackend
from attnprobe.errors import AttnprobeError
from attnprobe.probe import texts
from attnprobe.probe.census import Census, CensusConfig
from attnprobe.probe.retrieval import CENSUS as RETRIEVAL, heads_table, run_sample

from planted import BOS, COPY_HEAD, planted_model
from test_retrieval import tiny_model

SIZES = dict(census=False, perplexity_tokens=256, fit_tokens=256, fit_steps=1)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    return model, NativeBackend(model)


def _hedgehog(tiny, tmp_path, monkeypatch, bos: str):
    model, backend = tiny
    fitted = []
    real = architectures.fit_heads
    monkeypatch.setattr(architectures, "fit_heads", lambda b, ids, *a, **k: fitted.append(ids) or real(b, ids, *a, **k))
    variant = Variant("all-hedgehog", "hedgehog", lambda m, h: set(), "every head hedgehog")
    row, rows = evaluate_variant(model, backend, variant, None, tmp_path, MatrixSizes.quick(bos=bos, **SIZES))
    return row, rows, fitted, json.loads((tmp_path / "texts.json").read_text())


def test_matrix_fits_on_text_it_never_evaluates(tiny, tmp_path, monkeypatch):
    """The fit's teacher pass reads the fit range; perplexity and NIAH read ranges disjoint from it."""
    row, _, fitted, used = _hedgehog(tiny, tmp_path, monkeypatch, "off")
    model, _ = tiny
    start, end = texts.token_range(model.tokenizer, "fit")
    source = texts.source_ids(model.tokenizer)
    assert fitted[0].flatten().tolist() == source[start:start + fitted[0].numel()]
    spans = {r["purpose"]: (r["range"], r["token_start"], r["token_end"]) for r in used}
    assert spans["fit"][0] == "fit" and spans["perplexity"][0] == "perplexity"
    assert spans["NIAH haystack (evaluation)"][0] == "evaluation"
    fit = spans["fit"]
    for purpose, (name, first, last) in spans.items():
        if purpose != "fit":
            assert last <= fit[1] or first >= fit[2], purpose
    assert math.isfinite(row["perplexity"])


def test_matrix_uses_the_runs_one_bos_convention(tiny, tmp_path, monkeypatch):
    """BOS on: the fit's teacher pass, like every evaluation of the run, starts its rows with BOS."""
    row, _, fitted, _ = _hedgehog(tiny, tmp_path, monkeypatch, "on")
    model, _ = tiny
    assert row["bos"] is True
    assert bool((fitted[0][:, 0] == model.tokenizer.bos_token_id).all())


def test_matrix_writes_the_depth_grids_of_passkey_and_niah(tiny, tmp_path):
    """niah.parquet (the recall_grids figure's input) holds every depth x length task, not passkey alone."""
    model, backend = tiny
    variant = Variant("original", None, lambda m, h: set(), "the pretrained model")
    architectures.run_matrix(model, backend, [variant], None, tmp_path, MatrixSizes.quick(**SIZES))
    grids = pd.read_parquet(tmp_path / "niah.parquet")
    assert set(grids["task"]) == {"passkey", "niah"}
    assert set(pd.read_parquet(tmp_path / "recall.parquet")["task"]) == {"passkey", "niah", "kv_recall", "copying"}


def test_census_and_matrix_quote_one_perplexity(tmp_path):
    """The census's massive-activation intervention ("none" row) and the matrix score the same text
    with the same function: one number."""
    model = planted_model()
    backend = NativeBackend(model)
    config = CensusConfig(sink_sequences=8, prose_sequences=1, prose_length=96, perplexity_tokens=384, perplexity_length=128)
    Census(model, backend, config, tmp_path / "census").execute(("massive", "massive_intervention"))
    census = pd.read_parquet(tmp_path / "census" / "massive_intervention.parquet")
    sizes = MatrixSizes.quick(census=False, perplexity_tokens=384, perplexity_length=128)
    original = Variant("original", None, lambda m, h: set(), "")
    row, _ = evaluate_variant(model, backend, original, None, tmp_path / "matrix", sizes)
    assert row["perplexity"] == pytest.approx(float(census.loc[census["intervention"] == "none", "perplexity"].item()), rel=1e-6)


def test_retrieval_column_is_undefined_when_no_sample_is_accepted(tmp_path):
    """No NIAH sample answered: the score is NaN, not '0 retrieval heads', and the row says how many were accepted."""
    mechanism = next(m for m in RETRIEVAL if getattr(m, "presence", None))
    samples = [{"accepted": False, "answer_span": [3, 5], "copy_counts": [[0, 0]], "forced_copy_counts": [[2, 0]]}] * 3
    (tmp_path / "niah_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    heads = heads_table(samples, 1, 2)
    columns = mechanism.matrix_columns(tmp_path, heads, {"retrieval": 0.1})
    assert columns["retrieval_samples"] == 0 and columns["retrieval_samples_total"] == 3
    assert math.isnan(columns["retrieval_heads"]) and columns["retrieval_present"] is None
    assert columns["teacher_forced_retrieval_heads"] == 1  # head 0 copies the answer when it is fed


def test_teacher_forced_score_finds_the_copy_head_of_a_model_that_cannot_answer():
    """The planted copy head copies the answer; with the unembedding scrambled the model answers
    wrong (no accepted sample, retrieval score undefined), but teacher forcing still finds the head."""
    model = planted_model()
    g = torch.Generator().manual_seed(1)
    filler = (torch.randperm(30, generator=g) + 2).tolist()
    key, answer, haystack = filler[0], filler[1:5], filler[5:]
    prompt = [BOS] + haystack[:12] + [key] + answer + haystack[12:] + [key]
    start = 1 + 12 + 1
    sample = {"prompt_ids": prompt, "answer_span": [start, start + 4], "answer": model.tokenizer.decode(answer)}
    backend = NativeBackend(model)
    good = run_sample(model, backend, sample, max_new_tokens=4)
    assert good["accepted"] and np.asarray(good["forced_copy_counts"])[COPY_HEAD] == 4
    with torch.no_grad():
        model.hf.lm_head.weight.copy_(model.hf.lm_head.weight.roll(1, dims=0))  # predicts the next id instead
    broken = run_sample(model, backend, sample, max_new_tokens=4)
    assert not broken["accepted"]
    forced = np.asarray(broken["forced_copy_counts"])
    assert forced[COPY_HEAD] == 4 and forced.sum() == 4
    table = heads_table([broken], 2, 4).set_index(["layer", "head"])
    assert table["retrieval_score"].isna().all()
    assert table.loc[COPY_HEAD, "teacher_forced_retrieval_score"] == 1.0


def test_matrix_accuracies_carry_wilson_intervals():
    """Samples are scored per task with a Wilson interval; copying scores the share of tokens right
    (all but the first of each string) with a bootstrap over strings, n counting strings."""
    from attnprobe.analyses.experiments.ablation import wilson_interval
    from attnprobe.analyses.experiments.architectures import _accuracy_columns, matrix_markdown

    rows = pd.DataFrame([{"task": "passkey", "length": 512, "correct": c} for c in [True] * 9 + [False]]
                        + [{"task": "copying", "length": 11, "correct": False, "token_accuracy": 0.8}] * 2)
    columns = _accuracy_columns(rows)
    assert columns["passkey_acc"] == 0.9 and columns["passkey_n"] == 10
    assert (columns["passkey_ci_low"], columns["passkey_ci_high"]) == wilson_interval(9, 10)
    assert columns["copy_n"] == 2 and columns["copy_acc"] == pytest.approx(0.8)
    assert columns["copy_ci_low"] == pytest.approx(0.8) == columns["copy_ci_high"]  # two identical strings: no spread
    assert columns["kv_recall_n"] == 0 and math.isnan(columns["kv_recall_acc"])
    text = matrix_markdown(pd.DataFrame([{"architecture": "original", "description": "x", **columns}]))
    low, high = wilson_interval(9, 10)
    assert f"0.90 ({low:.2f}-{high:.2f}, n=10)" in text and "passkey_ci_low" not in text


def test_gpu_sizes_measure_efficiency_to_32k_and_leave_contexts_past_the_window_undefined(tiny, monkeypatch):
    model, backend = tiny
    sizes = MatrixSizes.gpu()
    assert sizes.efficiency_contexts == (2048, 8192, 32768)
    assert MatrixSizes.gpu(efficiency_contexts=(64,)).efficiency_contexts == (64,)  # a given size is kept
    measured = []
    monkeypatch.setattr(architectures, "measure_decoding",
                        lambda m, b, edits, context, tokens: measured.append(context) or {"decode_tokens_per_s": 1.0})
    monkeypatch.setattr(model.info, "max_context", 8192)
    columns = architectures.efficiency_columns(model, backend, [], sizes)
    assert measured == [2048, 8192]
    assert columns["decode_tokens_per_s_8192"] == 1.0 and math.isnan(columns["decode_tokens_per_s_32768"])


def test_matrix_takes_niah_haystacks_from_a_users_long_file(tiny, tmp_path):
    """--niah-haystack: the NIAH haystacks come from that file's evaluation range (grown with the file, so a
    long file reaches long contexts), perplexity still from the embedded prose; a missing file is one clear error."""
    model, backend = tiny
    long_text = tmp_path / "long.txt"
    paragraph = "The river carried the small boat past the old mill and under the stone bridge at dawn. "
    long_text.write_text("\n".join(f"{paragraph * 3} Chapter {i} ends here." for i in range(2000)))
    embedded = texts.token_range(model.tokenizer, "evaluation")
    start, end = texts.token_range(model.tokenizer, "evaluation", str(long_text))
    assert end - start > embedded[1] - embedded[0]  # the long file's evaluation range outgrows the embedded one
    sizes = MatrixSizes.quick(niah_haystack=str(long_text), niah_lengths=(512,), **SIZES)
    variant = Variant("original", None, lambda m, h: set(), "the pretrained model")
    evaluate_variant(model, backend, variant, None, tmp_path / "run", sizes)
    used = {r["purpose"]: r for r in json.loads((tmp_path / "run" / "texts.json").read_text())}
    assert str(long_text) in used["NIAH haystack (evaluation)"]["source"]
    assert used["NIAH haystack (evaluation)"]["token_start"] == start
    assert "pydoc_data" in used["perplexity"]["source"]
    with pytest.raises(AttnprobeError, match="text file not found"):
        MatrixSizes(niah_haystack=str(tmp_path / "missing.txt"))


def test_matrix_stars_rows_that_differ_from_the_original_on_the_same_prompts():
    """Paired on the same prompts: losing 10 of 40 passkeys differs at 0.05 (exact McNemar p = 0.002),
    losing 1 does not; copying compares its strings' token accuracy by a paired bootstrap."""
    from attnprobe.analyses.experiments.architectures import _accuracy_columns, differences_from, differs, matrix_markdown

    def rows(variant, wrong, copy_accuracy):
        passkeys = [{"variant": variant, "task": "passkey", "length": 512, "depth": 0.5, "sample": i, "correct": i >= wrong}
                    for i in range(40)]
        copies = [{"variant": variant, "task": "copying", "length": 11, "depth": math.nan, "sample": i,
                   "correct": copy_accuracy == 1.0, "token_accuracy": copy_accuracy} for i in range(12)]
        return passkeys + copies

    recall = pd.DataFrame(rows("original", 0, 1.0) + rows("lossy", 10, 0.5) + rows("close", 1, 1.0))
    assert differs(recall, "passkey", "lossy", "original") is True
    assert differs(recall, "passkey", "close", "original") is False
    assert differs(recall, "copying", "lossy", "original") is True and differs(recall, "copying", "close", "original") is False
    assert differs(recall, "passkey", "lossy", "absent") is None
    table = pd.DataFrame([{"architecture": v, **_accuracy_columns(recall[recall["variant"] == v], ("passkey", "copying"))}
                          for v in ("original", "lossy", "close")])
    table = differences_from(table, recall, ("passkey", "copying"))
    assert table["passkey_differs"].tolist() == [None, True, False]
    text = matrix_markdown(table)
    assert "0.75 (" in text and "n=40) *" in text and "differs from the original" in text and "passkey_differs" not in text
