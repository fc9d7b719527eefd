"""The hostile hour on convert, budget, the model cache, figures and ablate (issue 45), on tiny models: options
refused before any model loads, run directories locked, settings compared on resume, damaged files redone or
named in one line, training text decoded strictly, a damaged fp32 copy never served."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from attnprobe.analyses.conversion import data as training
from attnprobe.analyses.conversion import train as conversion
from attnprobe.analyses.experiments import budget
from attnprobe.errors import AttnprobeError
from attnprobe.hooks import embedded, model as model_module
from attnprobe.hooks.backends import make_backend
from attnprobe.hooks.model import load_model
from attnprobe.probe import texts
from attnprobe.probe.rundir import RunDir, census_heads, same_settings
from tiny_hf import tiny_model_dir

LENGTH = 32


def one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def run_cli(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """main() in this process, as the console script runs it."""
    from attnprobe.analyses import cli

    monkeypatch.setattr(sys, "argv", ["attnprobe", *map(str, args)])
    with pytest.raises(SystemExit) as code:
        cli.main()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code.value.code, captured.out, captured.err)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model = load_model(str(tiny_dir), device="cpu")
    backend = make_backend("native", model)
    yield model, backend
    backend.close()


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    path = tmp_path_factory.mktemp("census")
    pd.DataFrame([{"layer": l, "head": h, "kv_head": h // 2, "retrieval_score": 0.1 * h + l}
                  for l in range(2) for h in range(4)]).to_parquet(path / "heads.parquet", index=False)
    return path


# ---- options checked in the config dataclasses, before any model loads --------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"length": 0}, "--length must be a whole number of at least 2"),
    ({"batch": 0}, "--batch must be a whole number of at least 1"),
    ({"accumulation": 0}, "--accumulation must be a whole number of at least 1"),
    ({"batch": 8, "accumulation": 3}, "make --batch a multiple of 3"),
    ({"lr": 0.0}, "--lr must be a number above 0"),
    ({"transfer_lr": float("nan")}, "--transfer-lr must be a number above 0"),
    ({"warmup": 1.5}, "--warmup must be a number at least 0 and at most 1"),
    ({"lora_rank": 0}, "--lora-rank must be a whole number of at least 1"),
    ({"checkpoint_every": 0}, "--checkpoint-every must be a whole number of at least 1"),
    ({"tokens": 0, "transfer_tokens": 0}, "not both 0"),
    ({"train": "everything"}, "unknown --train"),
])
def test_convert_config_refuses_impossible_settings(changes, message):
    with pytest.raises(AttnprobeError, match=message.replace("(", r"\(")) as error:
        conversion.ConvertConfig(**changes)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("changes, message", [
    ({"budgets": (0.0,)}, "--budgets are shares"),
    ({"budgets": (1.5,)}, "--budgets are shares"),
    ({"selectors": ("oracle",)}, "unknown --selectors oracle"),
    ({"tasks": ()}, "--tasks names no recall task"),
    ({"tasks": ("copy",)}, "unknown recall task 'copy'"),
    ({"unit": "layer"}, "unknown --unit 'layer'"),
    ({"passkey_lengths": (0,)}, "--passkey-lengths takes whole numbers of at least 16"),
    ({"niah_depths": (2.0,)}, "--niah-depths are fractions"),
    ({"perplexity_tokens": 0}, "--perplexity-tokens takes whole numbers of at least 2"),
    ({"chunk": 0}, "--chunk takes whole numbers of at least 1"),
    ({"niah_needles": 99}, "--niah-needles 99"),
    ({"kinds": ("nonsense",)}, "unknown kernel 'nonsense'"),
])
def test_budget_sizes_refuse_impossible_settings(changes, message):
    with pytest.raises(AttnprobeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        budget.BudgetSizes.quick(**changes)


@pytest.mark.parametrize("args, message", [
    (["--length", "0"], "--length must be a whole number of at least 2"),
    (["--batch", "0"], "--batch must be a whole number of at least 1"),
    (["--accumulation", "0"], "--accumulation must be a whole number of at least 1"),
    (["--tokens", "lots"], "cannot read a token count from 'LOTS'"),
    (["--tokens", "infM"], "cannot read a token count from 'INFM'"),
    (["--epochs", "0"], "--epochs and --sample-batch must be whole numbers of at least 1"),
    (["--sample-batch", "0"], "--epochs and --sample-batch must be whole numbers of at least 1"),
    (["--quick", "--gpu-sizes"], "--quick and --gpu-sizes contradict each other"),
    (["--tasks", "passkey,bogus"], "unknown recall task 'bogus'"),
])
def test_convert_options_are_refused_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys, args, message):
    from attnprobe.analyses import cli

    monkeypatch.setattr(cli, "_load", lambda spec: pytest.fail("the model was loaded before the options were checked"))
    one_line(run_cli(monkeypatch, capsys, "convert", "--model", tiny_dir, "--out", tmp_path / "run", *args), message)
    assert not (tmp_path / "run").exists()


# ---- locking ------------------------------------------------------------------------------------------------

def _hold_lock(out):
    """Another process holding `out` (as a running convert or budget does) until it is killed."""
    code = ("import sys, time; from attnprobe.probe.rundir import RunDir\n"
            "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_convert_or_budget_on_one_out_is_refused_before_loading(tiny_dir, census, tmp_path, monkeypatch, capsys):
    from attnprobe.analyses import cli

    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        monkeypatch.setattr(cli, "_load", lambda spec: pytest.fail("loaded a model into a directory in use"))
        for command in (["convert"], ["budget", "--from", census, "--quick"]):
            result = run_cli(monkeypatch, capsys, *command, "--model", tiny_dir, "--out", out)
            one_line(result, f"{out} is in use by another attnprobe run (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_reentrant_within_one_process_and_released(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock(), run.lock():  # the CLI holds it, then the library takes it again
        pass
    holder = _hold_lock(tmp_path / "run")  # released: another process gets it
    holder.kill()
    holder.wait()


def test_budget_library_call_is_locked_too(tiny, census, tmp_path):
    model, backend = tiny
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(AttnprobeError, match="is in use by another attnprobe run"):
            budget.run_sweep(model, backend, tmp_path, small_sizes(), census)
    finally:
        holder.kill()
        holder.wait()


# ---- budget: settings compared on resume, damaged files redone ---------------------------------------------

def small_sizes(**overrides):
    return budget.BudgetSizes.quick(**{"budgets": (0.5,), "selectors": ("retrieval",), "kinds": ("sink+window:sinks=2,window=8",),
                                       "sparse": (), "tasks": ("passkey",), **overrides})


def test_a_budget_rerun_with_other_settings_is_refused_and_damage_is_redone(tiny, census, tmp_path, monkeypatch):
    model, backend = tiny
    first = budget.run_sweep(model, backend, tmp_path, small_sizes(), census)["budget"]
    with pytest.raises(AttnprobeError, match=r"other settings \(niah_lengths, passkey_lengths\)"):
        budget.run_sweep(model, backend, tmp_path, small_sizes(passkey_lengths=(96,), niah_lengths=(96,)), census)
    assert json.loads((tmp_path / "settings.json").read_text())["passkey_lengths"] == [128]
    # which cells run may differ (split runs share a directory); what a cell holds may not
    budget.run_sweep(model, backend, tmp_path, small_sizes(budgets=(0.5, 0.25)), census, time_limit=0)
    other_census = tmp_path / "other-census"
    other_census.mkdir()
    scores = pd.read_parquet(census / "heads.parquet")
    scores.assign(retrieval_score=-scores["retrieval_score"]).to_parquet(other_census / "heads.parquet", index=False)
    with pytest.raises(AttnprobeError, match=r"other settings \(census_heads_sha256\)"):
        budget.run_sweep(model, backend, tmp_path, small_sizes(), other_census)

    cells = sorted((tmp_path / "cells").iterdir())
    damaged = cells[0] / "summary.parquet"
    damaged.write_bytes(damaged.read_bytes()[:20])  # truncated by a full disk
    (tmp_path / "rankings" / "retrieval.parquet").write_bytes(b"PAR1 not really")
    evaluated, real = [], budget.evaluate
    monkeypatch.setattr(budget, "evaluate", lambda *args: evaluated.append(args[-1]) or real(*args))
    again = budget.run_sweep(model, backend, tmp_path, small_sizes(), census)["budget"]
    assert evaluated == [cells[0].name]  # only the damaged cell ran again
    pd.testing.assert_frame_equal(again.sort_values(list(again.columns)).reset_index(drop=True),
                                  first.sort_values(list(first.columns)).reset_index(drop=True))
    assert len(pd.read_parquet(tmp_path / "rankings" / "retrieval.parquet")) > 0


@pytest.mark.parametrize("damage, message", [
    (b"not parquet at all", "is damaged (it does not read as parquet)"),
    (None, "not found: run `attnprobe census"),
])
def test_an_unreadable_census_heads_table_is_one_line(tmp_path, damage, message):
    if damage is not None:
        (tmp_path / "heads.parquet").write_bytes(damage)
    with pytest.raises(AttnprobeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        census_heads(tmp_path)


def test_convert_and_budget_name_a_damaged_from_table(tiny_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "census").mkdir()
    (tmp_path / "census" / "heads.parquet").write_bytes(b"truncated")
    for command in (["convert", "--kernel", "elu", "--heads", "top:2:retrieval_score"], ["budget", "--quick"]):
        result = run_cli(monkeypatch, capsys, *command, "--from", tmp_path / "census", "--model", tiny_dir,
                         "--out", tmp_path / command[0])
        one_line(result, "heads.parquet is damaged")


def test_settings_records_refuse_damage_and_older_runs(tmp_path):
    path = tmp_path / "settings.json"
    with pytest.raises(AttnprobeError, match="do not say which settings made them"):
        same_settings(path, {"a": 1}, "the cells", started=True)
    same_settings(path, {"a": 1}, "the cells", merge=True)
    same_settings(path, {"a": 1, "b": 2}, "the cells", merge=True)  # a new setting joins the record
    assert json.loads(path.read_text()) == {"a": 1, "b": 2}
    path.write_text('{"a": 1, "b"')
    with pytest.raises(AttnprobeError, match="is damaged, so the settings that made the cells are unknown"):
        same_settings(path, {"a": 1}, "the cells")


# ---- convert: damaged manifest redone, training text decoded strictly ---------------------------------------

def recipe(**changes):
    base = dict(kernel="hedgehog", length=LENGTH, batch=2, transfer_tokens=2 * 2 * LENGTH, tokens=2 * 2 * LENGTH,
                checkpoint_every=1)
    return conversion.ConvertConfig(**{**base, **changes})


def test_a_damaged_conversion_manifest_is_made_again_equal(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    model, backend = tiny
    prose = tmp_path / "train.txt"
    prose.write_text(texts.prose()[:20_000])
    config = recipe()
    data = training.training_data(model, 4 * 2 * LENGTH, LENGTH, [prose])
    heads = {0: [0, 1]}
    first = conversion.convert(model, backend, heads, config, data, tmp_path / "run")
    before = {**load_file(tmp_path / "run" / "fit" / "params.safetensors"), **load_file(tmp_path / "run" / "adapters.safetensors")}
    (tmp_path / "run" / "conversion.json").write_text('{"identity": {"form')  # cut short
    capsys.readouterr()
    again = conversion.convert(model, backend, heads, config, data, tmp_path / "run")
    assert "conversion.json is damaged; converting again from the last checkpoint" in capsys.readouterr().err
    assert again["losses"] == first["losses"] and again["budget"] == first["budget"]
    after = {**load_file(tmp_path / "run" / "fit" / "params.safetensors"), **load_file(tmp_path / "run" / "adapters.safetensors")}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    (tmp_path / "run" / "conversion.json").write_text("[1, 2]")  # valid JSON, not a manifest
    with pytest.raises(AttnprobeError, match="conversion.json is damaged: rerun the same attnprobe convert"):
        with conversion.applied(model, tmp_path / "run"):
            pass


@pytest.mark.parametrize("name, content, message", [
    ("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00", "holds NUL bytes"),
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "is not UTF-8 text"),
    ("records.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "is not UTF-8 text"),
    ("records.jsonl", b'{"text": "nul \\u0000 inside"}\n', "line 1 holds NUL bytes"),
])
def test_training_text_is_decoded_strictly(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AttnprobeError, match=message):
        training._documents_from_path(path)


def test_parquet_text_columns_are_decoded_strictly(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": [b"ok", b"\xff\xfe"]}).to_parquet(path)
    with pytest.raises(AttnprobeError, match="row 1 is not UTF-8 text"):
        training._documents_from_path(path)
    pd.DataFrame({"text": [1.5, 2.5]}).to_parquet(path)
    with pytest.raises(AttnprobeError, match="holds values that are not text"):
        training._documents_from_path(path)
    pd.DataFrame({"text": ["one", b"two"]}).to_parquet(path)
    assert training._documents_from_path(path) == ["one", "two"]


def test_census_and_convert_refuse_the_same_binary_file(tiny_dir, tmp_path, monkeypatch, capsys):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"GGUF\x03\x00\x00\x00 a model file, not text")
    census_result = run_cli(monkeypatch, capsys, "census", "--model", tiny_dir, "--out", tmp_path / "c", "--texts", path)
    convert_result = run_cli(monkeypatch, capsys, "convert", "--model", tiny_dir, "--out", tmp_path / "v", "--data", path,
                             "--tokens", "64", "--transfer-tokens", "64", "--length", "32", "--batch", "2")
    for result in (census_result, convert_result):
        one_line(result, "holds NUL bytes (a binary file?)")


# ---- the model cache never serves what it called damaged ----------------------------------------------------

def test_a_damaged_copy_that_cannot_be_removed_is_not_loaded(tiny_dir, tmp_path, monkeypatch, capsys):
    """A read-only cache (simulated: the rename that discards the copy fails, as it does for a user without write
    access): the load reads the GGUF itself and says so, instead of loading the damaged copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    digest = model_module.file_sha256(gguf)
    copy = model_module._copy_dir(gguf.name, digest)
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    model_module._save_copy(hf, tokenizer, copy, digest)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    real_replace = model_module.os.replace

    def read_only(source, target):
        if str(source) == str(copy):
            raise PermissionError(13, "Permission denied")
        return real_replace(source, target)

    sources = []

    def from_pretrained(spec, source, kwargs, dtype, trust_remote_code, device_map):
        sources.append((source, kwargs.get("gguf_file")))
        return tokenizer, AutoModelForCausalLM.from_pretrained(tiny_dir)

    monkeypatch.setattr(model_module.os, "replace", read_only)
    monkeypatch.setattr(model_module, "_check_gguf", lambda path: None)
    monkeypatch.setattr(model_module, "_from_pretrained", from_pretrained)
    capsys.readouterr()
    loaded = load_model(str(gguf), device="cpu")
    err = capsys.readouterr().err
    assert sources == [(str(tmp_path), "fake.gguf")]  # the GGUF, never the damaged copy
    assert f"the fp32 copy {copy} is damaged" in err and "cannot be removed" in err and "loading from the GGUF file" in err
    assert loaded.info.source == str(gguf) and copy.is_dir()


def test_an_embedded_cache_that_is_not_a_folder_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ATTNPROBE_CACHE", str(blocker))
    part = embedded.Part("fake-part", "1.0", "x/blob.bin", 4, "0" * 64)
    model = embedded.Embedded("fake", "fake", "fake.gguf", 8, "0" * 64, (part, part), "pip install fake")
    monkeypatch.setitem(embedded.MODELS, "fake", model)
    with pytest.raises(AttnprobeError, match=f"cannot write the model cache {blocker / 'gguf'}"):
        embedded.embedded_gguf_path("fake")


# ---- figures and ablate say what they did not do ------------------------------------------------------------

def test_figures_names_every_table_it_skipped(tmp_path, monkeypatch, capsys):
    from fixtures_runs import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", omit=("ablation", "matrix", "recall", "budget"))
    (run / "niah.parquet").write_bytes(b"damaged")
    result = run_cli(monkeypatch, capsys, "figures", run, "--format", "png")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "skipped niah.parquet: unreadable" in out
    assert "skipped recall_grids: niah.parquet unreadable" in out
    assert "skipped ablation_curves: ablation.parquet not in the run directory" in out
    assert "budget_curve, budget_curve_niah: budget.parquet not in the run directory" in out


def test_ablate_names_the_models_window(tiny_dir, tmp_path, monkeypatch, capsys):
    result = run_cli(monkeypatch, capsys, "ablate", "--model", tiny_dir, "--heads", "0.1", "--lengths", "100000",
                     "--out", tmp_path / "run")
    one_line(result, "--lengths 100000 does not fit the model's window of 2048 tokens (keep lengths <= 1984)")


def test_the_cache_keyword_raises_no_future_warning(tiny):
    import warnings

    from attnprobe.hooks.model import with_cache

    model, _ = tiny
    ids = torch.tensor([[1, 5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out, cache = with_cache(model.hf, None, input_ids=ids[:, :3])
        step, grown = with_cache(model.hf, cache, input_ids=ids[:, 3:])
    whole = model.hf(input_ids=ids).logits
    assert torch.allclose(step.logits[0, -1], whole[0, -1], atol=1e-5) and grown.get_seq_length() == 4



# ---- the main command's speed: the teacher-forced pass reuses the decoding's prefill ------------------------

def test_teacher_forced_counts_from_the_prefill_equal_the_whole_pass(tiny):
    """The census's teacher-forced retrieval score now reads the answer-predicting queries on top of the decoding's
    prefill (a few tokens) instead of re-running the whole prompt with patterns: the same counts."""
    from attnprobe.probe import retrieval

    model, backend = tiny
    with torch.no_grad():  # sharper attention than the default init, so argmax keys are not near-ties
        for layer in model.hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    try:
        hay = texts.haystack_ids(model.tokenizer, 256)
        compared = 0
        for index, needle in enumerate(retrieval.load_needles()[:3]):
            for depth in (0.0, 0.5, 1.0):
                sample = retrieval.build_sample(model.tokenizer, hay[:96 + 80 * index], needle, depth)
                whole = retrieval.teacher_forced_counts(backend, sample)
                decoded = retrieval.run_sample(model, backend, sample, max_new_tokens=4)
                assert decoded["forced_copy_counts"] == whole.tolist()
                compared += int(whole.sum() > 0)
        assert compared > 0  # some samples do copy, so equality is not trivially 0 == 0
    finally:
        with torch.no_grad():
            for layer in model.hf.model.layers:
                layer.self_attn.q_proj.weight.div_(8)


def test_a_census_on_a_short_user_text_completes_with_default_options(tmp_path):
    """About 2K tokens of the user's own text as --texts and --haystack, every other option at its default: each
    stage that needs more text shrinks (fewer or shorter rows, fewer NIAH lengths) and says so; no FutureWarning."""
    from tiny_hf import attnprobe

    model = tiny_model_dir(tmp_path, max_positions=4096)  # the default NIAH lengths reach 2048
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prose, chars = texts.prose(), 2000
    while len(tokenizer(prose[:chars]).input_ids) < 2000:
        chars += 200
    text = tmp_path / "mine.txt"
    text.write_text(prose[:chars])
    out = tmp_path / "run"
    result = attnprobe("census", "--model", model, "--out", out, "--texts", text, "--haystack", text)
    assert result.returncode == 0, result.stderr[-3000:]
    said = " ".join(result.stdout.split())
    for note in ("sink rate: the text holds", "prose: the text holds", "massive intervention: the text's perplexity range holds",
                 "retrieval: the haystack holds"):
        assert note in said, said[-3000:]
    assert "FutureWarning" not in result.stderr and "deprecated" not in result.stderr, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("one row of" in note for note in manifest["notes"])
    assert len(pd.read_parquet(out / "massive_intervention.parquet")) > 0
    assert {s["length"] for s in map(json.loads, (out / "niah_samples.jsonl").read_text().splitlines())} == {512}
