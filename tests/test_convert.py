"""Two-stage conversion on a tiny Llama with a real BPE tokenizer: training path = inference path, loss goes
down, resume after an interruption equals an uninterrupted run, the control, the gate, data sources, bad input."""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from attnprobe.analyses.conversion import train as conversion
from attnprobe.analyses.conversion import data as training
from attnprobe.analyses.conversion import stage2
from attnprobe.analyses.experiments.architectures import gate, gate_columns
from attnprobe.hooks.backends import make_backend
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import load_model
from attnprobe.hooks.swap import swap_edits
from attnprobe.kernels.dispatch import differentiable
from attnprobe.probe import texts
from tiny_hf import tiny_model_dir

LENGTH = 32
HEADS = {0: [0, 2], 1: [0, 1, 2, 3]}  # a mixed layer and a layer replaced whole


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tiny(model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATTNPROBE_CACHE", str(tmp_path_factory.mktemp("cache")))
        model = load_model(str(model_dir), device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():  # sharper attention than the default init, so kernels differ visibly from softmax
            for layer in model.hf.model.layers:
                layer.self_attn.q_proj.weight.normal_(0, 0.3)
                layer.self_attn.k_proj.weight.normal_(0, 0.3)
        backend = make_backend("native", model)
        yield model, backend
        backend.close()


@pytest.fixture(scope="module")
def prose_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(texts.prose()[:60_000])
    return path


def recipe(**changes):
    base = dict(kernel="hedgehog", length=LENGTH, batch=4, transfer_tokens=4 * 4 * LENGTH, tokens=4 * 4 * LENGTH,
                transfer_lr=2e-2, lr=3e-3, checkpoint_every=2)
    return conversion.ConvertConfig(**{**base, **changes})


def data_for(model, config, prose_file):
    tokens = (config.steps(config.transfer_tokens) + config.steps(config.tokens)) * config.batch * config.length
    return training.training_data(model, tokens, config.length, [prose_file])


@pytest.mark.parametrize("kernel,options", [("sink+window+linear", {"window": 4, "sinks": 1}), ("gated-deltanet", {})])
def test_training_path_equals_inference_path(tiny, prose_file, tmp_path, kernel, options):
    """The student trains through the kernels' quadratic forms with gradients; evaluation (backend.run) runs
    the prefill forms; both give the same logits for the same converted model, adapters included."""
    model, backend = tiny
    config = recipe(kernel=kernel, options=options, transfer_tokens=2 * 4 * LENGTH, tokens=2 * 4 * LENGTH)
    data = data_for(model, config, prose_file)
    conversion.convert(model, backend, HEADS, config, data, tmp_path)
    ids = data.windows[:2]
    with conversion.applied(model, tmp_path) as fit:
        adapters = [p for name, p in model.hf.named_parameters() if "lora_B" in name]
        assert adapters and all(p.abs().sum() > 0 for p in adapters)  # stage 2 moved the adapters
        inference = backend.run(ids, edits=swap_edits(model, fit))
        student = conversion.Student(model.hf, fit.kernels, fit.heads, LENGTH)
        with backend.patched(student.edits), differentiable():
            trained = student(ids)
        assert trained.requires_grad
    torch.testing.assert_close(trained.float(), inference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (backend.run(ids) - inference).abs().max() > 1e-3  # the conversion is really on, and gone afterwards


def test_conversion_lowers_its_losses_and_generates(tiny, prose_file, tmp_path):
    model, backend = tiny
    config = recipe(transfer_tokens=6 * 4 * LENGTH, tokens=6 * 4 * LENGTH)
    manifest = conversion.convert(model, backend, HEADS, config, data_for(model, config, prose_file), tmp_path)
    curve = manifest["losses"]["transfer"]
    assert len(curve) == 6 and sum(curve[-2:]) / 2 < curve[0], curve
    before, after = manifest["losses"]["first_batch_kl"]  # stage 2's batches differ; its KL on one fixed batch falls
    assert len(manifest["losses"]["end_to_end"]) == 6 and after < 0.95 * before, (before, after)
    before, after = manifest["head_error_after_transfer"], manifest["head_error"]
    assert set(before) == {"0", "1"} and len(before["0"]) == 2 and len(after["1"]) == 4
    assert manifest["budget"] == {"transfer_tokens": 6 * 4 * LENGTH, "tokens": 6 * 4 * LENGTH, "transfer_steps": 6, "steps": 6}
    assert manifest["data"]["sha256"] and manifest["model_hash"] == model.info.weights_sha256
    assert {p.name for p in tmp_path.iterdir()} >= {"fit", "adapters.safetensors", "conversion.json", "checkpoint.json"}
    prompt = torch.tensor([texts.fit_ids(model.tokenizer, 12)])
    with conversion.applied(model, tmp_path) as fit, backend.patched(swap_edits(model, fit)):
        out = model.hf.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 18)


def _parameters(directory):
    from safetensors.torch import load_file

    return {**load_file(directory / "fit" / "params.safetensors"), **load_file(directory / "adapters.safetensors")}


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny, prose_file, tmp_path):
    model, backend = tiny
    config = recipe(transfer_tokens=4 * 4 * LENGTH, tokens=4 * 4 * LENGTH)
    data = data_for(model, config, prose_file)
    whole = conversion.convert(model, backend, HEADS, config, data, tmp_path / "whole")
    for stage, step in (("transfer", 3), ("end_to_end", 3)):  # killed after step 3; the checkpoint is from step 2
        def stop(report, stage=stage, step=step):
            if report.stage == stage and report.step == step:
                raise Interrupt
        with pytest.raises(Interrupt):
            conversion.convert(model, backend, HEADS, config, data, tmp_path / "resumed", on_step=stop)
        assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["step"] == 2
    resumed = conversion.convert(model, backend, HEADS, config, data, tmp_path / "resumed")
    assert resumed["losses"] == whole["losses"]
    want, got = _parameters(tmp_path / "whole"), _parameters(tmp_path / "resumed")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_a_run_out_of_memory_resumes_with_more_accumulation_steps(tiny, prose_file, tmp_path):
    """Accumulation splits the same global batch, so it is not part of the recipe: a run stopped in stage 2
    resumes with twice the steps (the losses of the same global batches, up to rounding), the probes cover the
    same first batch, and the finished conversion is taken as it is under a third setting."""
    model, backend = tiny
    config = recipe(transfer_tokens=2 * 4 * LENGTH, tokens=4 * 4 * LENGTH)
    data = data_for(model, config, prose_file)
    whole = conversion.convert(model, backend, HEADS, config, data, tmp_path / "whole")

    def stop(report):
        if report.stage == "end_to_end" and report.step == 3:
            raise Interrupt
    with pytest.raises(Interrupt):
        conversion.convert(model, backend, HEADS, config, data, tmp_path / "resumed", on_step=stop)
    saved = tmp_path / "resumed" / "checkpoint.json"  # as written before accumulation left the recipe
    manifest = json.loads(saved.read_text())
    saved.write_text(json.dumps({**manifest, "config": {**manifest["config"], "accumulation": 1}}))
    split = recipe(transfer_tokens=2 * 4 * LENGTH, tokens=4 * 4 * LENGTH, accumulation=2)
    resumed = conversion.convert(model, backend, HEADS, split, data, tmp_path / "resumed")
    assert resumed["losses"]["transfer"] == whole["losses"]["transfer"]
    assert resumed["losses"]["end_to_end"][:2] == whole["losses"]["end_to_end"][:2]  # from the checkpoint
    for key in ("end_to_end", "first_batch_kl"):
        torch.testing.assert_close(torch.tensor(resumed["losses"][key]), torch.tensor(whole["losses"][key]), rtol=1e-4, atol=1e-6)
    for layer, errors in whole["head_error"].items():
        torch.testing.assert_close(torch.tensor(resumed["head_error"][layer]), torch.tensor(errors), rtol=1e-4, atol=1e-8)
    assert resumed["config"]["accumulation"] == 2
    again = conversion.convert(model, backend, HEADS, recipe(transfer_tokens=2 * 4 * LENGTH, tokens=4 * 4 * LENGTH,
                                                              accumulation=4), data, tmp_path / "resumed")
    assert again == resumed
    with pytest.raises(AttnprobeError, match=r"another recipe \(lr 0.003 != 0.001\)"):
        stopped = tmp_path / "stopped"
        with pytest.raises(Interrupt):
            conversion.convert(model, backend, HEADS, config, data, stopped, on_step=stop)
        conversion.convert(model, backend, HEADS, recipe(transfer_tokens=2 * 4 * LENGTH, tokens=4 * 4 * LENGTH, lr=1e-3),
                           data, stopped)


def test_a_checkpoint_becomes_a_partial_conversion(tiny, prose_file, tmp_path):
    """A run stopped in stage 2 is evaluated as what it is: its checkpoint's kernels and adapters, its budget the
    tokens trained so far, `partial` where it stopped; a stage-1 checkpoint, a finished conversion and other
    weights are refused."""
    from safetensors.torch import load_file

    model, backend = tiny
    config = recipe(transfer_tokens=2 * 4 * LENGTH, tokens=4 * 4 * LENGTH)
    data = data_for(model, config, prose_file)
    for stage, directory in (("transfer", tmp_path / "early"), ("end_to_end", tmp_path / "late")):
        def stop(report, stage=stage):
            if report.stage == stage and report.step == 3 - (stage == "transfer"):
                raise Interrupt
        with pytest.raises(Interrupt):
            conversion.convert(model, backend, HEADS, config, data, directory, on_step=stop)
    with pytest.raises(AttnprobeError, match="stage 1"):
        conversion.conversion_from_checkpoint(model, tmp_path / "early")
    late = tmp_path / "late"
    checkpoint = json.loads((late / "checkpoint.json").read_text())
    saved = load_file(late / checkpoint["tensors"])
    manifest = conversion.conversion_from_checkpoint(model, late)
    assert manifest["partial"]["step"] == 2 and manifest["partial"]["steps"] == 4
    assert manifest["budget"] == {"transfer_tokens": 2 * 4 * LENGTH, "tokens": 2 * 4 * LENGTH, "transfer_steps": 2, "steps": 2}
    kernels, adapters = load_file(late / "fit" / "params.safetensors"), load_file(late / "adapters.safetensors")
    assert kernels and adapters
    for prefix, tensors in (("param.kernel.", kernels), ("param.adapter.", adapters)):
        for key, value in tensors.items():
            assert torch.equal(value, saved[prefix + key]), key
    ids = data.windows[:1]
    with conversion.applied(model, late) as fit:
        converted = backend.run(ids, edits=swap_edits(model, fit))
    assert (converted - backend.run(ids)).abs().max() > 1e-3
    with pytest.raises(AttnprobeError, match="already holds a finished conversion"):
        conversion.conversion_from_checkpoint(model, late)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.json").write_text(json.dumps({**checkpoint, "model_hash": "0" * 64}))
    with pytest.raises(AttnprobeError, match="other|from weights"):
        conversion.conversion_from_checkpoint(model, foreign)


def test_recomputed_layers_train_exactly_as_kept_ones(tiny, prose_file, tmp_path):
    """Stage 2 with every decoder layer recomputed in the backward pass (the memory saver on the GPU) gives the
    same losses and parameters as keeping the activations; the replaced heads are recomputed as kernels,
    not as softmax, although the backward runs after the edit session has closed."""
    model, backend = tiny
    config = recipe(transfer_tokens=2 * 4 * LENGTH, tokens=3 * 4 * LENGTH)
    data = data_for(model, config, prose_file)
    kept = conversion.convert(model, backend, HEADS, config, data, tmp_path / "kept")
    redone = conversion.convert(model, backend, HEADS, config, data, tmp_path / "recomputed", recompute_layers=True)
    assert redone["losses"]["end_to_end"] == pytest.approx(kept["losses"]["end_to_end"], rel=1e-5)
    want, got = _parameters(tmp_path / "kept"), _parameters(tmp_path / "recomputed")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(want[key], got[key], atol=1e-6), key
    assert type(model.hf.model.layers[0]).forward is model.hf.model.layers[0].forward.__func__  # restored


def test_the_control_fine_tunes_only_adapters(tiny, prose_file, tmp_path):
    model, backend = tiny
    config = recipe(kernel=None, ce_weight=1.0, tokens=3 * 4 * LENGTH)
    manifest = conversion.convert(model, backend, {}, config, data_for(model, config, prose_file), tmp_path)
    assert manifest["heads"] == {} and "transfer" not in manifest["losses"] and len(manifest["losses"]["end_to_end"]) == 3
    assert not (tmp_path / "fit").exists()
    ids = texts.fit_ids(model.tokenizer, 24)
    base = backend.run(torch.tensor([ids]))
    with conversion.applied(model, tmp_path) as fit:
        assert fit is None
        tuned = backend.run(torch.tensor([ids]))
    assert (tuned - base).abs().max() > 1e-4
    torch.testing.assert_close(backend.run(torch.tensor([ids])), base)  # the adapters are gone again


def test_gate_limits_and_columns():
    assert gate(10.9, 10.0, 0.5)["gate"] == "pass" and gate(11.1, 10.0, 0.25)["gate"] == "FAIL"
    assert gate(12.4, 10.0, 0.0)["gate"] == "pass" and gate(12.6, 10.0, 0.1)["gate"] == "FAIL"
    import pandas as pd

    table = pd.DataFrame({"architecture": ["original", "control", "hybrid", "linear"], "softmax_heads": [8, 8, 4, 0],
                          "perplexity": [20.0, 18.0, 20.0, 23.0], "passkey_acc": [1.0, 1.0, 0.5, 0.0]})
    gated = gate_columns(table, total_heads=8).set_index("architecture")
    assert list(gated["gate"]) == ["reference", "reference", "FAIL", "FAIL"]  # 20/18 > 1.10, 23/18 > 1.25
    assert gated.loc["linear", "ppl_vs_original"] == pytest.approx(1.15) and gated.loc["linear", "passkey_acc"] == 0.0
    assert gated.loc["hybrid", "gate_limit"] == 1.10 and gated.loc["linear", "gate_limit"] == 1.25


def test_chunked_distillation_loss_equals_the_whole_batch_kl(monkeypatch):
    """The loss in pieces (recomputed in the backward) has the value and gradient of one KL over every token."""
    monkeypatch.setattr(stage2, "KL_CHUNK", 5)  # 3 x 4 = 12 tokens: pieces of 5, 5 and 2
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 4, 11, generator=generator)
    ids = torch.randint(0, 11, (3, 4), generator=generator)
    loss = conversion.distillation_loss(logits, teacher, ids, 0.0)
    (grad,) = torch.autograd.grad(loss, logits)
    whole = torch.nn.functional.kl_div(torch.log_softmax(logits, -1).flatten(0, 1), torch.log_softmax(teacher, -1).flatten(0, 1),
                                       log_target=True, reduction="batchmean")
    (whole_grad,) = torch.autograd.grad(whole, logits)
    assert loss.item() > 0 and torch.allclose(loss, whole, atol=1e-6) and torch.allclose(grad, whole_grad, atol=1e-7)


def test_learning_rate_warms_up_then_decays():
    rates = [conversion.lr_at(step, 100, 1.0, 0.1, 0.1) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] == pytest.approx(0.1, abs=1e-3)


# ---- training data --------------------------------------------------------------------------------------


def test_user_files_folders_jsonl_and_parquet(tiny, tmp_path):
    import pandas as pd

    model, _ = tiny
    text = texts.prose()[:8000]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text(text[:4000])
    (folder / "b.md").write_text(text[4000:])
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": text[i:i + 2000]}) for i in range(0, 8000, 2000)))
    pd.DataFrame({"text": [text]}).to_parquet(tmp_path / "d.parquet")
    counts = []
    for source in (folder, tmp_path / "c.jsonl", tmp_path / "d.parquet"):
        data = training.training_data(model, 20 * LENGTH, LENGTH, [source])
        assert data.windows.shape == (20, LENGTH) and data.windows.dtype == torch.long
        counts.append(data.description["pool_windows"])
    assert min(counts) >= 20 and max(counts) - min(counts) <= 3  # the same text in three containers
    again = training.training_data(model, 20 * LENGTH, LENGTH, [tmp_path / "d.parquet"])
    assert again.description["sha256"] == data.description["sha256"]


def test_self_samples_are_cached_seeded_and_resumable(tiny, monkeypatch):
    model, _ = tiny
    calls = []
    generate = model.hf.generate
    monkeypatch.setattr(model.hf, "generate", lambda *a, **kw: calls.append(1) or generate(*a, **kw))
    first = training.self_samples(model, 7, 40, seed=5, batch=3)
    assert first.shape == (7, 40) and len(calls) == 3
    folder = training._shard_dir(model, 40, 5, 3)
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) == 3
    prose = training.training_prose_ids(model)
    for row in first.tolist():  # each sample continues a 16-token prompt from the training range
        prompt = row[len(training._bos(model)):len(training._bos(model)) + training.PROMPT_TOKENS]
        assert any(prose[i:i + len(prompt)] == prompt for i in range(len(prose) - len(prompt)))
    shards[1].write_bytes(shards[1].read_bytes()[:50])  # a shard cut short by a kill
    shards[2].unlink()
    calls.clear()
    assert torch.equal(training.self_samples(model, 7, 40, seed=5, batch=3), first) and len(calls) == 2
    calls.clear()
    assert torch.equal(training.self_samples(model, 7, 40, seed=5, batch=3), first) and not calls  # all cached now
    assert not torch.equal(training.self_samples(model, 3, 40, seed=6, batch=3), first[:3])


def test_default_data_mixes_prose_with_self_samples(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr(training, "SAMPLE_BATCH", 4)
    prose_windows = len(training._pack(model, [training.training_prose_ids(model)], 64))
    data = training.training_data(model, (prose_windows + 5) * 64, 64)
    assert data.description["prose_windows"] == prose_windows and data.description["self_samples"] == 5
    assert data.windows.shape == (prose_windows + 5, 64)


# ---- bad input: one line, the fix, nothing trained lost -----------------------------------------------


def test_budget_larger_than_the_data(tiny, prose_file):
    model, _ = tiny
    with pytest.raises(AttnprobeError, match="lower --tokens, add data or raise --epochs"):
        training.training_data(model, 10_000_000, LENGTH, [prose_file])
    data = training.training_data(model, 100 * LENGTH, LENGTH, [prose_file])
    twice = training.training_data(model, 2 * data.description["pool_windows"] * LENGTH, LENGTH, [prose_file], epochs=2)
    assert twice.description["epochs"] == 2


def test_a_dataset_name_without_a_network_fails_at_once(monkeypatch, tiny):
    model, _ = tiny
    monkeypatch.setattr(socket, "create_connection", lambda *a, **kw: (_ for _ in ()).throw(OSError("offline")))
    started = time.perf_counter()
    with pytest.raises(AttnprobeError, match="no network to fetch dataset 'wikitext:wikitext-2-raw-v1'.*--data"):
        training.training_data(model, 1000, LENGTH, dataset="wikitext:wikitext-2-raw-v1")
    assert time.perf_counter() - started < 5


def test_unknown_kernel_or_heads_fail_before_training(tiny, prose_file, tmp_path):
    model, backend = tiny
    config = recipe(tokens=2 * 4 * LENGTH, transfer_tokens=0)
    data = data_for(model, config, prose_file)
    with pytest.raises(AttnprobeError, match="unknown kernel 'softermax'"):
        conversion.convert(model, backend, HEADS, recipe(kernel="softermax", tokens=2 * 4 * LENGTH, transfer_tokens=0), data, tmp_path)
    with pytest.raises(AttnprobeError, match="outside the model"):
        conversion.convert(model, backend, {0: [7]}, config, data, tmp_path)
    with pytest.raises(AttnprobeError, match="multiple of 3"):
        conversion.convert(model, backend, HEADS, recipe(accumulation=3), data, tmp_path)
    assert not (tmp_path / "checkpoint.json").exists()


def test_foreign_or_damaged_checkpoints_are_refused_and_kept(tiny, prose_file, tmp_path):
    model, backend = tiny
    config = recipe(transfer_tokens=3 * 4 * LENGTH, tokens=0)
    data = data_for(model, config, prose_file)

    def stop(report):
        if report.step == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        conversion.convert(model, backend, HEADS, config, data, tmp_path, on_step=stop)
    manifest_path = tmp_path / "checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    tensors = tmp_path / manifest["tensors"]
    with pytest.raises(AttnprobeError, match="another kernel"):
        conversion.convert(model, backend, HEADS, recipe(kernel="window+linear", transfer_tokens=3 * 4 * LENGTH, tokens=0), data, tmp_path)
    with pytest.raises(AttnprobeError, match="other heads"):
        conversion.convert(model, backend, {0: [1]}, config, data, tmp_path)
    manifest_path.write_text(json.dumps({**manifest, "model_hash": "f" * 64}))
    with pytest.raises(AttnprobeError, match="other model weights"):
        conversion.convert(model, backend, HEADS, config, data, tmp_path)
    manifest_path.write_text(json.dumps(manifest))
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(AttnprobeError, match="missing or damaged.*another --out"):
        conversion.convert(model, backend, HEADS, config, data, tmp_path)
    assert tensors.stat().st_size == len(good) // 2 and manifest_path.exists()  # nothing deleted
    manifest_path.write_text("{not json")
    with pytest.raises(AttnprobeError, match="not valid JSON"):
        conversion.convert(model, backend, HEADS, config, data, tmp_path)
    manifest_path.write_text(json.dumps(manifest))
    tensors.write_bytes(good)
    finished = conversion.convert(model, backend, HEADS, config, data, tmp_path)  # repaired: it resumes and finishes
    assert len(finished["losses"]["transfer"]) == 3


def test_cli_bad_input_exits_2_with_one_line(model_dir, prose_file, tmp_path, monkeypatch, capsys):
    import sys

    from attnprobe.analyses import cli
    cases = [(["--kernel", "softermax", "--layers", "0"], "unknown kernel"),
             (["--kernel", "hedgehog", "--heads", "0.9"], "out of range"),
             (["--variants", "all-nothing"], "unknown variant"),
             (["--kernel", "hedgehog", "--layers", "0", "--tokens", "20G", "--data", str(tmp_path / "x.txt")], "not found"),
             (["--kernel", "hedgehog", "--layers", "0", "--tokens", "20M", "--data", str(prose_file)], "lower --tokens"),
             (["--kernel", "hedgehog", "--layers", "0", "--tokens", "lots"], "cannot read a token count"),
             (["--kernel", "hedgehog", "--layers", "0", "--dataset", "wikitext", "--tokens", "1K"], "no network"),
             (["--kernel", "hedgehog", "--layers", "0", "--loss", "fused"], "unknown stage-2 loss 'fused'"),
             (["--kernel", "hedgehog", "--layers", "0", "--length", "4096"], "lower --length to at most 2048")]
    monkeypatch.setattr(socket, "create_connection", lambda *a, **kw: (_ for _ in ()).throw(OSError("offline")))
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["attnprobe", "convert", "--model", str(model_dir), *args, "--out", str(tmp_path / "run")])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
    assert not (tmp_path / "run").exists()


# ---- data parallel: two processes over gloo against one ------------------------------------------------


def _sharpen(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.hf.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 0.3)
            layer.self_attn.k_proj.weight.normal_(0, 0.3)


def _ddp_worker(rank, world, port, model_dir, prose_file, out):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ATTNPROBE_CACHE=str(out / "cache"))
    torch.set_num_threads(1)
    model = load_model(str(model_dir), device="cpu")
    _sharpen(model)
    config = recipe(transfer_tokens=2 * 4 * LENGTH, tokens=2 * 4 * LENGTH, checkpoint_every=100)
    manifest = conversion.convert(model, make_backend("native", model), HEADS, config,
                                  data_for(model, config, prose_file), out / "run")
    if rank == 0:
        (out / "losses.json").write_text(json.dumps({**manifest["losses"], "processes": manifest["processes"]}))


def test_two_processes_over_gloo_follow_one_process(model_dir, prose_file, tmp_path, monkeypatch):
    """accelerate's data parallelism: the same global batch split over 2 processes gives 1 process's loss curve."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, model_dir, prose_file, tmp_path / "two"), nprocs=2, join=True)
    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path / "one" / "cache"))
    model = load_model(str(model_dir), device="cpu")
    _sharpen(model)
    config = recipe(transfer_tokens=2 * 4 * LENGTH, tokens=2 * 4 * LENGTH, checkpoint_every=100)
    one = conversion.convert(model, make_backend("native", model), HEADS, config, data_for(model, config, prose_file),
                             tmp_path / "one" / "run")
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for stage in ("transfer", "end_to_end", "first_batch_kl"):
        torch.testing.assert_close(torch.tensor(two[stage]), torch.tensor(one["losses"][stage]), rtol=1e-5, atol=1e-9)


def test_gpu_script_runs_its_plan_on_the_cpu(model_dir, tmp_path, monkeypatch):
    """benchmarks/gpu_convert.py --quick on the tiny model: every part, and the files it hands back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_convert

    out = tmp_path / "out"
    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path / "cache"))
    code = gpu_convert.main(["--model", str(model_dir), "--part", "all", "--out", str(out), "--work", str(tmp_path / "work"),
                             "--rows", "all-hedgehog", "--tokens", str(2 * 2 * LENGTH), "--transfer-tokens", str(2 * 2 * LENGTH),
                             "--length", str(LENGTH), "--batch", "2", "--bench-steps", "3", "--sample-batch", "8", "--quick",
                             "--recompute-layers"])
    assert code == 0
    kinds = [json.loads(line)["kind"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert kinds == ["loaded", "throughput", "plan", "data", "converted", "converted", "matrix", "done"]
    throughput = json.loads((out / "throughput.json").read_text())
    assert throughput["all-hedgehog/end_to_end"]["tokens_per_s"] > 0 and "control/end_to_end" in throughput
    assert throughput["recompute_layers"] is True
    matrix = (out / "matrix.md").read_text()
    assert "all-hedgehog" in matrix and "control" in matrix and "gate" in matrix
    import tarfile

    with tarfile.open(out / "conversions-1.tar") as tar:
        names = tar.getnames()
    assert "conversions/all-hedgehog/fit/params.safetensors" in names and "conversions/control/adapters.safetensors" in names
    assert not any("checkpoint" in name for name in names)

    # rows converted elsewhere (the tar unpacked into a fresh --work) are evaluated on the CPU without training data
    work = tmp_path / "elsewhere"
    (work / "run").mkdir(parents=True)
    with tarfile.open(out / "conversions-1.tar") as tar:
        tar.extractall(work / "run", filter="data")
    monkeypatch.setattr("attnprobe.analyses.conversion.data.training_data", lambda *a, **k: pytest.fail("evaluating sampled training data"))
    import pandas as pd

    again = tmp_path / "again"
    code = gpu_convert.main(["--model", str(model_dir), "--part", "evaluate,census", "--sizes", "quick", "--out", str(again),
                             "--work", str(work), "--rows", "all-hedgehog"])
    assert code == 0
    kinds = [json.loads(line)["kind"] for line in (again / "results.jsonl").read_text().splitlines()]
    assert kinds == ["loaded", "matrix", "census", "done"]
    census = pd.read_parquet(again / "census.parquet").set_index("architecture")
    assert list(census.index) == ["original", "control", "all-hedgehog"] and census["sink_rate"].notna().all()
    evaluated = pd.read_parquet(again / "matrix.parquet").set_index("architecture")
    assert {"original", "control", "all-hedgehog"} <= set(evaluated.index)
    first = pd.read_parquet(out / "matrix.parquet").set_index("architecture")
    assert evaluated.loc["all-hedgehog", "perplexity"] == pytest.approx(first.loc["all-hedgehog", "perplexity"], rel=1e-4)
    assert gpu_convert.main(["--model", str(model_dir), "--part", "convert", "--out", str(again), "--work", str(work)]) == 2
    # saved rows are reused only at the sizes that measured them: a census at another induction period is refused
    from attnprobe.errors import AttnprobeError

    with pytest.raises(AttnprobeError, match="other sizes .*census_induction_length"):
        gpu_convert.main(["--model", str(model_dir), "--part", "census", "--sizes", "quick", "--out", str(again),
                          "--work", str(work), "--rows", "all-hedgehog", "--census-induction-length", "30"])
    assert json.loads((work / "run" / "census.sizes.json").read_text())["census_induction_length"] == 50
    moved = tmp_path / "moved"
    (moved / "run").mkdir(parents=True)
    (moved / "run" / "conversions").symlink_to(work / "run" / "conversions")
    assert gpu_convert.main(["--model", str(model_dir), "--part", "census", "--sizes", "quick", "--out", str(again),
                             "--work", str(moved), "--rows", "all-hedgehog", "--census-induction-length", "30"]) == 0
    config = json.loads(next((moved / "run" / "census" / "original").rglob("config.json")).read_text())
    assert config["induction_length"] == 30


def test_cli_converts_heads_and_the_control(model_dir, prose_file, tmp_path, monkeypatch):
    import sys

    from attnprobe.analyses import cli
    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["attnprobe", "convert", "--model", str(model_dir), "--kernel", "hedgehog", "--heads", "1.0,1.3",
                                      "--tokens", str(2 * 2 * LENGTH), "--transfer-tokens", str(2 * 2 * LENGTH), "--length", str(LENGTH),
                                      "--batch", "2", "--data", str(prose_file), "--no-evaluate", "--out", str(out)])
    with pytest.raises(SystemExit) as finished:
        cli.main()
    assert finished.value.code == 0
    row = json.loads((out / "conversions" / "convert-hedgehog" / "conversion.json").read_text())
    assert row["heads"] == {"1": [0, 3]} and len(row["losses"]["transfer"]) == 2 and row["data"]["files"] == [str(prose_file)]
    control = json.loads((out / "conversions" / "control" / "conversion.json").read_text())
    assert control["heads"] == {} and control["kernel"] is None and len(control["losses"]["end_to_end"]) == 2


@pytest.mark.parametrize("train", ["kernels", "attention"])
def test_other_stage2_modes_train_and_restore(tiny, prose_file, tmp_path, train):
    model, backend = tiny
    config = recipe(train=train, transfer_tokens=0, tokens=2 * 4 * LENGTH)
    before = {name: p.detach().clone() for name, p in model.hf.named_parameters()}
    manifest = conversion.convert(model, backend, HEADS, config, data_for(model, config, prose_file), tmp_path)
    assert manifest["train"] == train and len(manifest["losses"]["end_to_end"]) == 2
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapters.safetensors")
    if train == "kernels":
        assert saved == {}
    else:  # the four projections of every layer, trained, and the model itself given back untouched
        assert len(saved) == 4 * model.info.n_layers
        assert any(not torch.equal(value, before[name]) for name, value in saved.items())
    assert all(torch.equal(p, before[name]) for name, p in model.hf.named_parameters())
    ids = torch.tensor([texts.fit_ids(model.tokenizer, 24)])
    with conversion.applied(model, tmp_path) as fit:
        converted = backend.run(ids, edits=swap_edits(model, fit))
    with conversion.adapted(model, train, config.lora_rank, saved):
        again = backend.run(ids, edits=swap_edits(model, conversion.load_fit(tmp_path / "fit")))
    torch.testing.assert_close(converted, again)


def test_saved_rows_without_their_sizes_are_not_reused(tmp_path):
    """Rows saved by an older run say nothing of their sizes: a rerun refuses them rather than mixing them in."""
    from attnprobe.analyses.experiments.architectures import MatrixSizes
    from attnprobe.analyses.conversion.rows import _same_sizes
    from attnprobe.errors import AttnprobeError

    (tmp_path / "variants").mkdir()
    (tmp_path / "variants" / "original.json").write_text("{}")
    with pytest.raises(AttnprobeError, match="do not say which sizes"):
        _same_sizes(tmp_path / "variants", MatrixSizes())
    _same_sizes(tmp_path / "census", MatrixSizes())  # nothing saved yet: the sizes are recorded
    _same_sizes(tmp_path / "census", MatrixSizes())
    with pytest.raises(AttnprobeError, match="other sizes \\(perplexity_tokens\\)"):
        _same_sizes(tmp_path / "census", MatrixSizes(perplexity_tokens=64))
