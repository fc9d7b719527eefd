"""Stage 2's fast path: the KL from hidden states in pieces equals the full-logit KL (value and gradient),
training through it equals training through full logits, and the throughput benchmark's CPU path runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnprobe.analyses.conversion import train as conversion
from attnprobe.analyses.conversion.stage2 import FastPath, chunked_distillation, head_of
from attnprobe.errors import AttnprobeError
from attnprobe.kernels.registry import make_kernel
from tiny_hf import tiny_gemma3, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _full(student, teacher, weight, ids, ce_weight, softcap=None):
    def logits(h):
        z = h @ weight.T
        return softcap * torch.tanh(z / softcap) if softcap else z
    return conversion.distillation_loss(logits(student), logits(teacher), ids, ce_weight)


@pytest.mark.parametrize("ce_weight, softcap, chunk", [(0.0, None, 5), (0.7, None, 4), (0.3, 2.0, 7), (0.0, None, 100)])
def test_chunked_distillation_equals_the_full_logit_loss(ce_weight, softcap, chunk):
    """Pieces of `chunk` tokens (not dividing the 3 x 5 = 15), the CE term, the softcap: value and gradient."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(13, 8, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, 13, (3, 5), generator=generator)
    want = _full(student, teacher, weight, ids, ce_weight, softcap)
    (want_grad,) = torch.autograd.grad(3.0 * want, student)
    got = chunked_distillation(student, teacher, weight, ids, ce_weight, softcap, chunk)
    (got_grad,) = torch.autograd.grad(3.0 * got, student)  # an upstream gradient other than 1 is carried through
    assert want.item() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)  # both compute in fp32
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)  # both compute in fp32


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ce_weight, softcap", [(0.0, None), (0.3, 2.0)])
def test_the_compiled_loss_equals_the_eager_one(ce_weight, softcap, device):
    """torch.compile's fusion of a piece's elementwise work (the CUDA default through Triton; inductor's C++ backend
    on the CPU) gives the eager closed form's value and gradient, with a last piece shorter than the others and
    ignored targets."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 9, 16, generator=generator).to(device).requires_grad_()
    teacher, weight = (torch.randn(*shape, generator=generator).to(device) for shape in ((2, 9, 16), (50, 16)))
    ids = torch.randint(0, 50, (2, 9), generator=generator).to(device)
    results = []
    for compiled in (False, True):
        value = chunked_distillation(student, teacher, weight, ids, ce_weight, softcap, chunk=8, compiled=compiled)
        results.append((value, torch.autograd.grad(value, student)[0]))
    assert results[0][0].item() > 0.1
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)


def test_a_machine_where_compile_fails_runs_the_loss_eagerly_and_says_so(monkeypatch):
    from attnprobe.analyses.conversion import stage2

    def failing(*args):
        raise torch._dynamo.exc.TorchDynamoException("no compiler here")

    monkeypatch.setattr(stage2, "_compiled_piece", None)
    monkeypatch.setattr(torch, "compile", lambda function, **options: failing)
    student, teacher, weight = torch.randn(1, 6, 8), torch.randn(1, 6, 8), torch.randn(20, 8)
    ids = torch.randint(0, 20, (1, 6))
    with pytest.warns(UserWarning, match="torch.compile failed for stage 2's loss"):
        value = chunked_distillation(student, teacher, weight, ids, chunk=4, compiled=True)
    assert stage2._compiled_piece is False
    assert torch.equal(value, chunked_distillation(student, teacher, weight, ids, chunk=4, compiled=False))


def test_the_hidden_state_path_reads_the_models_head():
    hf = tiny_llama()
    decoder, weight, softcap = head_of(hf)
    ids = torch.tensor([[1, 5, 9, 4]])
    with torch.no_grad():
        hidden = decoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(hidden @ weight.T, hf(input_ids=ids).logits)
    assert softcap is None
    gemma = tiny_gemma3()
    gemma.config.final_logit_softcapping = 3.0
    with torch.no_grad():
        _, weight, softcap = head_of(gemma)
        hidden = gemma.get_decoder()(input_ids=ids).last_hidden_state
        torch.testing.assert_close(softcap * torch.tanh(hidden @ weight.T / softcap), gemma(input_ids=ids).logits)
    gemma.config.final_logit_softcapping = None
    gemma.config.logit_scale = 0.5
    with pytest.raises(AttnprobeError, match="--loss logits"):
        head_of(gemma)


def test_bad_fast_path_options_name_the_fix():
    with pytest.raises(AttnprobeError, match="choose one of chunked, liger, logits"):
        FastPath(loss="fused").check()
    if not torch.cuda.is_available():
        with pytest.raises(AttnprobeError, match="--loss chunked"):
            FastPath(loss="liger").check()


def test_the_benchmark_matrix_runs_on_the_cpu(tmp_path):
    """Two rows at one length, old and new paths: one JSON line each, phases that add up, the FLOP count's MFU;
    a path this machine cannot run (liger's loss without CUDA) is a row saying why, and the others go on; --profile
    writes each measured row's profiler tables."""
    command = [sys.executable, str(ROOT / "benchmarks" / "convert_bench.py"), "--matrix", str(tmp_path), "--models", "tiny",
               "--rows", "control,all-gated-deltanet", "--lengths", "32", "--tokens-per-step", "128", "--micro-tokens", "64",
               "--steps", "1", "--paths", "old,new,liger-loss", "--profile"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "convert_bench.jsonl").read_text().splitlines()]
    assert [(r["row"], r["path"]) for r in records] == [(row, path) for row in ("control", "all-gated-deltanet")
                                                        for path in ("old", "new", "liger-loss")]
    assert all("liger-kernel" in r["error"] for r in records if r["path"] == "liger-loss")  # no CUDA here
    records = [r for r in records if r["path"] != "liger-loss"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import convert_bench

    for record in records:
        assert record["batch"] == 4 and record["micro_batch"] == 2 and record["tokens_per_s"] > 0
        assert set(record["phase_share"]) == {"teacher forward", "student forward", "loss", "backward", "optimizer"}
        assert sum(record["phase_share"].values()) == pytest.approx(1.0, abs=1e-3)
        flops = convert_bench.stage2_flops_per_token(convert_bench.tiny_config(), 32)["mfu_count"]
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * flops / 989e12, rel=1e-2, abs=1e-4)
    assert records[2]["train_forms"] == "quadratic" and records[0]["train_forms"] is None
    profile = (tmp_path / "profile-tiny-all-gated-deltanet-32-new.txt").read_text()
    assert profile.startswith("wall ") and "aten::mm" in profile
    assert not (tmp_path / "profile-tiny-control-32-liger-loss.txt").exists()


KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
from attnprobe.analyses.conversion import data, train
from attnprobe.hooks.backends import make_backend
from attnprobe.hooks.model import load_model

model_dir, recipe, tokens, text, out = sys.argv[1:]
model = load_model(model_dir, device="cpu")
config = train.ConvertConfig(**json.loads(recipe))
windows = data.training_data(model, int(tokens), config.length, [Path(text)])

def kill(report):  # the machine is lost between two steps
    if report.stage == "end_to_end" and report.step == 3:
        os.kill(os.getpid(), signal.SIGKILL)

train.convert(model, make_backend("native", model), {0: [0, 2], 1: [0, 1, 2, 3]}, config, windows, Path(out), on_step=kill)
"""


def test_a_run_killed_between_steps_resumes_on_a_fresh_machine_from_its_timed_checkpoint(tmp_path):
    """Checkpoints by the clock (here every step: checkpoint_minutes tiny, checkpoint_every never): a process
    killed (SIGKILL) after stage-2 step 3 leaves step 3's checkpoint, a few MB to copy; copied into another
    directory and resumed by another process, the conversion ends bit for bit where an uninterrupted one does."""
    import shutil

    from attnprobe.analyses.conversion import data as training
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model
    from attnprobe.probe import texts
    from tiny_hf import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "model")
    text = tmp_path / "train.txt"
    text.write_text(texts.prose()[:60_000])
    recipe = dict(kernel="gated-deltanet", length=32, batch=4, transfer_tokens=2 * 4 * 32, tokens=5 * 4 * 32, lr=3e-3,
                  checkpoint_every=100, checkpoint_minutes=1e-9)
    tokens = 7 * 4 * 32
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(model_dir), json.dumps(recipe), str(tokens), str(text),
                             str(tmp_path / "lost")], capture_output=True, text=True, timeout=600,
                            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                 "OMP_NUM_THREADS": str(torch.get_num_threads())})  # bit for bit needs the same reductions
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoint = json.loads((tmp_path / "lost" / "checkpoint.json").read_text())
    assert (checkpoint["stage"], checkpoint["step"], checkpoint["next_sequence"]) == ("end_to_end", 3, 12)
    assert sum(p.stat().st_size for p in (tmp_path / "lost").iterdir()) < 50 * 2 ** 20
    shutil.copytree(tmp_path / "lost", tmp_path / "fresh")

    model = load_model(str(model_dir), device="cpu")
    backend = make_backend("native", model)
    config = conversion.ConvertConfig(**recipe)
    data = training.training_data(model, tokens, config.length, [text])
    heads = {0: [0, 2], 1: [0, 1, 2, 3]}
    resumed = conversion.convert(model, backend, heads, config, data, tmp_path / "fresh")
    whole = conversion.convert(model, backend, heads, config, data, tmp_path / "whole")
    assert resumed["losses"] == whole["losses"] and len(whole["losses"]["end_to_end"]) == 5
    from safetensors.torch import load_file

    for name in ("fit/params.safetensors", "adapters.safetensors"):
        want, got = load_file(tmp_path / "whole" / name), load_file(tmp_path / "fresh" / name)
        assert want.keys() == got.keys() and all(torch.equal(want[key], got[key]) for key in want), name


def test_windows_pack_side_by_side_into_training_sequences():
    windows = torch.arange(7 * 4).view(7, 4)
    sequences = conversion.packed(windows, conversion.ConvertConfig(length=8, window=4))
    assert sequences.shape == (3, 8) and torch.equal(sequences[1], torch.arange(8, 16))  # the 7th window is left over
    assert torch.equal(conversion.packed(windows, conversion.ConvertConfig(length=4)), windows)
    with pytest.raises(AttnprobeError, match="does not pack whole windows of 4 tokens: make it a multiple of --window 4, e.g. 8"):
        conversion.packed(windows, conversion.ConvertConfig(length=10, window=4))
    with pytest.raises(AttnprobeError, match="training windows are 4 tokens but the recipe says 8"):
        conversion.packed(windows, conversion.ConvertConfig(length=8))


def test_a_sequence_beyond_the_models_window_is_refused_before_training(tmp_path):
    from attnprobe.analyses.conversion.data import TrainingData
    from attnprobe.hooks.backends import make_backend
    from tiny_hf import TinyTokenizer, wrap

    model = wrap(tiny_llama(), TinyTokenizer())  # 128 positions
    data = TrainingData(torch.zeros(4, 256, dtype=torch.long), {"sha256": "0"})
    config = conversion.ConvertConfig(kernel=None, length=256, batch=2, transfer_tokens=0, tokens=512)
    with pytest.raises(AttnprobeError, match="exceed the model's window of 128: lower --length to at most 128"):
        conversion.convert(model, make_backend("native", model), {}, config, data, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["decay", "gated-deltanet"])
def test_the_benchmarks_old_looped_forms_equal_the_batched_ones(name):
    """The benchmark's old path (chunk after chunk) computes what the batched forms compute, and is undone after."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import convert_bench
    from attnprobe.kernels.deltanet import kernel as delta
    from attnprobe.kernels.gla import chunk as forms

    kernel = make_kernel(name, 2, 8, chunk=16)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=generator) for _ in range(3))
    batched = kernel.prefill(q, k, v, 0.3)
    with convert_bench.looped_forms(True):
        assert (forms.scalar_chunked.__name__, delta.wy_chunked.__name__) == ("scalar", "wy")
        looped = kernel.prefill(q, k, v, 0.3)
    assert delta.wy_chunked.__name__ == "wy_chunked" and forms.scalar_chunked.__name__ == "scalar_chunked"
    for got, want in zip(looped, batched):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_frozen_weights_in_bf16_for_the_stage_and_back_bit_for_bit():
    """Inside the block the frozen weights are bf16 and the adapters fp32 (they train in fp32); a student forward
    under autocast stays close to the fp32 one; afterwards every weight is its fp32 self again, bit for bit."""
    from attnprobe.analyses.conversion.stage2 import frozen_in_bf16
    from tiny_hf import TinyTokenizer, wrap

    model = wrap(tiny_llama(), TinyTokenizer())
    before = {name: p.detach().clone() for name, p in model.hf.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 4, 7, 3]])
    with conversion.adapted(model, "lora", 4) as adapters:
        with torch.no_grad():
            for p in adapters.values():
                p.normal_(0, 0.1)  # B starts at 0: make the adapters count
            want = model.hf(input_ids=ids).logits
        with frozen_in_bf16(model.hf, True):
            frozen = [p for p in model.hf.parameters() if not p.requires_grad]
            assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
            assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = model.hf(input_ids=ids).logits
            got.float().sum().backward()
            assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapters.values())
        torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)
        assert all(p.dtype == torch.float32 for p in model.hf.parameters())
    after = dict(model.hf.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_under_autocast_the_student_skips_peft_input_casts_and_computes_the_same():
    """peft casts each LoRA input to fp32, which autocast casts back for the matmul: the student turns that off
    under autocast (fewer copies), computes what peft's casting path computes, and leaves peft as it was."""
    from contextlib import nullcontext

    from peft.tuners.tuners_utils import BaseTunerLayer

    from attnprobe.analyses.conversion.stage2 import Stage2Step
    from attnprobe.hooks.backends import make_backend
    from tiny_hf import TinyTokenizer, wrap

    model = wrap(tiny_llama(), TinyTokenizer())
    backend = make_backend("native", model)
    ids = torch.randint(0, model.info.vocab_size, (2, 12))
    with conversion.adapted(model, "lora", 4) as params:
        for p in params.values():
            torch.nn.init.normal_(p, std=0.2)  # lora_B starts at 0: make the adapters count
        student = conversion.Student(model.hf, {}, {}, 12, hidden=True)
        layers = [m for m in model.hf.modules() if isinstance(m, BaseTunerLayer)]
        seen = []
        hook = layers[0].register_forward_pre_hook(lambda m, args: seen.append(m.cast_input_dtype_enabled))
        outputs = {}
        for name, autocast in (("fp32", nullcontext), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
            step = Stage2Step(model.hf, backend, student.edits, None, FastPath(), 0.0, autocast)
            outputs[name] = step.student(student, ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # peft's own casting path, by hand
            casting = student(ids)
        hook.remove()
    assert seen == [True, False, True]
    assert all(layer.cast_input_dtype_enabled for layer in layers)
    assert outputs["bf16"].dtype == casting.dtype and torch.equal(outputs["bf16"], casting)
    torch.testing.assert_close(outputs["bf16"].float(), outputs["fp32"], atol=0.1, rtol=0.1)


LIGER_AGAINST_OURS = """
import torch
from attnprobe.analyses.conversion.stage2 import chunked_distillation, liger_distillation
torch.manual_seed(0)
weight = 0.5 * torch.randn(96, 16)
student, teacher = torch.randn(3, 7, 16, requires_grad=True), torch.randn(3, 7, 16)
ids = torch.randint(0, 96, (3, 7))
values, grads = [], []
for loss in (lambda: liger_distillation(student, teacher, weight), lambda: chunked_distillation(student, teacher, weight, ids, chunk=5)):
    value = loss()
    grads.append(torch.autograd.grad(value, student)[0])
    values.append(value.item())
print(values[0], values[1], (grads[0] - grads[1]).abs().max().item(), grads[1].abs().max().item())
"""


def test_liger_kernels_fused_linear_kl_equals_ours_under_the_interpreter():
    """`--loss liger` (liger-kernel's fused linear JSD at beta 0) and the chunked KL give the same mean per-token
    KL(teacher || student) and the same gradient: liger's Triton kernels run on the CPU through Triton's
    interpreter, in a process of their own (the interpreter must be on before triton is imported)."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is in the [test] extra")
    done = subprocess.run([sys.executable, "-c", LIGER_AGAINST_OURS], capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    liger, ours, grad_difference, grad_scale = map(float, done.stdout.split()[-4:])
    assert liger == pytest.approx(ours, rel=1e-5) and ours > 0.1
    assert grad_difference < 1e-5 * grad_scale + 1e-7
