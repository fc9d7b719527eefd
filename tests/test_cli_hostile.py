"""A hostile user's first hour, on the tiny local model: every bad input is one line and exit 2 before
anything is loaded or written, Ctrl-C exits 130, short or damaged inputs are handled, a run directory
holding other settings is refused and one in use is locked."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tiny_hf import CLI, attnprobe

SMALL = ["--lengths", "128", "--depths", "0.5", "--needles", "1", "--sink-sequences", "8", "--prose-length", "96",
         "--perplexity-tokens", "128", "--perplexity-length", "64"]


def one_line_error(result, message):
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture(scope="module")
def census_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "census"
    result = attnprobe("census", "--model", tiny, "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("args, message", [
    (["census", "--lengths", "0"], "--lengths are NIAH context lengths"),
    (["census", "--lengths", "-128"], "--lengths are NIAH context lengths"),
    (["census", "--lengths", "128.5"], "--lengths takes whole numbers"),
    (["census", "--depths", "1.5"], "--depths are fractions"),
    (["census", "--depths", "-0.1"], "--depths are fractions"),
    (["census", "--needles", "0"], "--needles must be a whole number of at least 1"),
    (["census", "--needles", "11"], "10 needles are packaged"),
    (["census", "--needles", "abc"], "Invalid value for '--needles'"),
    (["census", "--seed", "-1"], "--seed must be a whole number of at least 0"),
    (["census", "--bos", "maybe"], "--bos must be auto, on or off"),
    (["census", "--skip", "nonsense"], "unknown census stage 'nonsense'"),
    (["census", "--sink-threshold", "1.5"], "--sink-threshold must be at least 0 and below 1"),
    (["census", "--hidden-threshold", "0.01"], "must exceed 1"),
    (["census", "--texts", "/no/such/file.txt"], "text file not found"),
    (["census", "--skip", "massive"], "census stage massive_intervention needs massive"),
    (["ablate", "--sweep", "0", "--from", "CENSUS"], "--sweep takes head counts between 1 and 8"),
    (["ablate", "--sweep", "9", "--from", "CENSUS"], "--sweep takes head counts between 1 and 8"),
    (["ablate", "--sweep", "2"], "--sweep ranks heads by a census"),
    (["ablate", "--heads", "0.1", "--lengths", "0"], "--lengths are context lengths"),
    (["ablate", "--heads", "0.1", "--depths", "2"], "--depths are fractions"),
    (["ablate", "--layers", "0-1:every0"], ":everyN needs N of at least 1"),
    (["ablate", "--heads", "99.0"], "layer 99 is out of range"),
    (["ablate", "--heads", "0.1", "--mode", "nonsense"], "unknown ablation mode"),
    (["swap", "--kernel", "nonsense", "--layers", "0"], "unknown kernel 'nonsense'"),
    (["swap", "--kernel", "elu", "--layers", "0", "--fit-tokens", "0"], "--fit-tokens must be at least 1"),
    (["swap", "--kernel", "elu", "--layers", "0", "--passkey-lengths", "0"], "--passkey-lengths takes whole numbers"),
    (["swap", "--matrix", "--variants", "nonsense"], "unknown variant(s) nonsense"),
    (["figures", "NOWHERE"], "run directory not found"),
    (["figures", "CENSUS", "--format", "jpg"], "unknown figure format jpg"),
])
def test_bad_options_are_refused_before_anything_is_written(tiny, census_dir, tmp_path, args, message, monkeypatch, capsys):
    """In-process (main() as the console script runs it), so the many cases stay fast."""
    from attnprobe.analyses import cli
    args = [str(census_dir) if a == "CENSUS" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    if args[0] != "figures":
        args = args[:1] + ["--model", str(tiny), "--out", str(tmp_path / "run")] + args[1:]
    monkeypatch.setattr(sys, "argv", ["attnprobe", *args])
    with pytest.raises(SystemExit) as exit_code:
        cli.main()
    captured = capsys.readouterr()
    one_line_error(subprocess.CompletedProcess(args, exit_code.value.code, captured.out, captured.err), message)
    assert not (tmp_path / "run").exists()  # nothing written: the corrected command starts clean


def test_out_that_is_a_file_or_inside_one_or_unwritable(tiny, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(attnprobe("census", "--model", tiny, "--out", a_file), "is a file, not a directory")
    one_line_error(attnprobe("census", "--model", tiny, "--out", a_file / "run"), "lies inside the file")
    locked = tmp_path / "readonly"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        one_line_error(attnprobe("census", "--model", tiny, "--out", locked / "run"), "cannot be written")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("raised, message", [
    ("cuda", "out of memory (one allocation of 20.00 GiB): what finished is kept in --out"),
    ("cpu", "out of memory (one allocation of 37252.90 GiB)"),
    ("other", None),
])
def test_running_out_of_memory_is_one_line_naming_the_fix(tiny, tmp_path, monkeypatch, capsys, raised, message):
    import torch

    from attnprobe.analyses import cli
    error = {"cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                            "capacity of 139.81 GiB of which 1.2 GiB is free."),
             "cpu": RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 40000000000000 bytes. Error code 12"),
             "other": RuntimeError("shape mismatch")}[raised]
    monkeypatch.setattr(cli, "_load", lambda spec: (_ for _ in ()).throw(error))
    monkeypatch.setattr(sys, "argv", ["attnprobe", "convert", "--model", str(tiny), "--out", str(tmp_path / "run")])
    if message is None:  # a bug stays a traceback, not a message about memory
        with pytest.raises(RuntimeError, match="shape mismatch"):
            cli.main()
        return
    with pytest.raises(SystemExit) as exit_code:
        cli.main()
    captured = capsys.readouterr()
    one_line_error(subprocess.CompletedProcess([], exit_code.value.code, captured.out, captured.err), message)
    assert "--accumulation" in captured.err


def test_a_failed_census_does_not_block_the_corrected_command(tiny, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    out = tmp_path / "run"
    failed = attnprobe("census", "--model", tiny, "--out", out, "--texts", text, *SMALL)
    assert failed.returncode == 2 and "tokens" in failed.stderr, failed.stderr[-2000:]
    fixed = attnprobe("census", "--model", tiny, "--out", out, *SMALL, "--skip", "retrieval")
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_short_user_text_uses_fewer_sink_sequences_and_says_so(tiny, tmp_path):
    from transformers import AutoTokenizer

    from attnprobe.probe import texts

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    prose = texts.prose()
    chars = 2000
    while len(tokenizer(prose[:chars]).input_ids) < 2000:
        chars += 500
    text = tmp_path / "user.txt"
    text.write_text(prose[:chars])
    out = tmp_path / "run"
    result = attnprobe("census", "--model", tiny, "--out", out, "--texts", text, "--sink-sequences", "100",
                       "--prose-length", "96", "--perplexity-length", "64", "--lengths", "128", "--skip", "retrieval")
    assert result.returncode == 0, result.stderr[-3000:]
    used = json.loads((out / "sink_rate.json").read_text())["n_sequences"]
    assert 1 <= used < 100
    assert f"sink rate: the text holds {used} sequences of 64 tokens, so {used} were used, not 100" in " ".join(result.stdout.split())


@pytest.mark.parametrize("content, message", [(b"\xff\xfe\xfa not utf-8 \xc3\x28", "is not UTF-8 text"),
                                              (b"text\x00with\x00nul", "holds NUL bytes")])
def test_binary_or_non_utf8_texts_are_refused(tiny, tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    one_line_error(attnprobe("census", "--model", tiny, "--out", tmp_path / "run", "--texts", path), message)
    one_line_error(attnprobe("census", "--model", tiny, "--out", tmp_path / "run", "--haystack", path), message)


def test_ctrl_c_exits_130_and_the_rerun_resumes(tiny, tmp_path):
    """Interrupted mid-retrieval (150 NIAH samples, so work is surely left when the first one lands), the
    run exits 130 and the rerun keeps every finished stage and sample."""
    out = tmp_path / "run"
    many = ["--lengths", "128,192,256", "--depths", "0.1,0.3,0.5,0.7,0.9", "--needles", "10"] + SMALL[SMALL.index("--sink-sequences"):]
    command = CLI + ["census", "--model", str(tiny), "--out", str(out)] + many
    # a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: restore it
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    samples = out / "shards" / "niah"
    deadline = time.time() + 300
    while not any(samples.glob("*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the census ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "interrupted: rerun to resume" in stderr and "Traceback" not in stderr
    kept = {path.name: path.stat().st_mtime_ns for path in samples.glob("*.json")}
    assert 0 < len(kept) < 150 and (out / "shards" / "sinks.done").exists()
    sinks_done = (out / "shards" / "sinks.done").stat().st_mtime_ns
    rerun = attnprobe(*command[len(CLI):])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "heads.parquet").exists() and len(list(samples.glob("*.json"))) == 150
    assert (out / "shards" / "sinks.done").stat().st_mtime_ns == sinks_done
    assert all(samples.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())


def test_damaged_run_files_are_redone_or_named(tiny, census_dir, tmp_path):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(census_dir, out)
    before = pd.read_parquet(out / "heads.parquet")
    for name in ("shards/induction.parquet", "sinks.parquet", "niah_samples.jsonl", *[str(p.relative_to(out)) for p in (out / "shards" / "niah").glob("*.json")], "manifest.json"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    result = attnprobe("census", "--model", tiny, "--out", out, *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "induction: a file it saved is damaged, so it runs again" in " ".join(result.stdout.split())
    pd.testing.assert_frame_equal(before, pd.read_parquet(out / "heads.parquet"))
    config = out / "shards" / "config.json"
    config.write_text(config.read_text()[:20])
    one_line_error(attnprobe("census", "--model", tiny, "--out", out, *SMALL), "config.json is damaged")


def test_swap_resume_compares_settings_and_quick_keeps_explicit_sizes(tiny, tmp_path):
    out = tmp_path / "swap"
    base = ["swap", "--model", tiny, "--kernel", "hedgehog", "--quick", "--no-census", "--out", out]
    first = attnprobe(*base, "--layers", "0", "--fit-steps", "1")
    assert first.returncode == 0, first.stderr[-2000:]
    sizes = json.loads((out / "manifest.json").read_text())["sizes"]
    assert sizes["fit_steps"] == 1 and sizes["fit_tokens"] == 256  # explicit kept, the rest --quick's
    one_line_error(attnprobe(*base, "--layers", "1", "--fit-steps", "1"), "holds a swap with other settings (swap-hedgehog")
    one_line_error(attnprobe(*base, "--layers", "0", "--fit-steps", "2"), "other model weights or sizes")
    one_line_error(attnprobe(*[a if a != "hedgehog" else "elu" for a in base], "--layers", "0", "--fit-steps", "1"),
                   "holds a swap with other settings")
    for name in ("variants/swap-hedgehog.json", "fits/hedgehog/params.safetensors", "shards/swap.json"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 2])
    again = attnprobe(*base, "--layers", "0", "--fit-steps", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert list(pd.read_parquet(out / "matrix.parquet")["architecture"]) == ["original", "swap-hedgehog"]


def test_saved_fits_are_reused_only_with_the_same_budget(tiny, tmp_path, monkeypatch):
    from attnprobe.analyses.experiments import architectures
    from attnprobe.hooks.backends import make_backend
    from attnprobe.hooks.model import load_model

    model = load_model(str(tiny))
    backend = make_backend("native", model)
    fits = []
    original = architectures.fit_heads
    monkeypatch.setattr(architectures, "fit_heads", lambda *a, **k: fits.append(k["steps"]) or original(*a, **k))
    architectures.fitted_kernel(model, backend, "hedgehog", tmp_path, 128, 1)
    architectures.fitted_kernel(model, backend, "hedgehog", tmp_path, 128, 1)
    assert fits == [1]
    architectures.fitted_kernel(model, backend, "hedgehog", tmp_path, 128, 2)
    architectures.fitted_kernel(model, backend, "hedgehog", tmp_path, 64, 2)
    assert fits == [1, 2, 2]


def test_a_run_directory_in_use_is_locked(tiny, census_dir):
    from attnprobe.probe.rundir import RunDir

    with RunDir(census_dir).lock():
        result = attnprobe("census", "--model", tiny, "--out", census_dir, *SMALL)
        one_line_error(result, f"is in use by another attnprobe run (pid {os.getpid()})")
        one_line_error(attnprobe("figures", census_dir), f"(pid {os.getpid()})")
    assert attnprobe("figures", census_dir, "--format", "png").returncode == 0


def test_empty_prompt_and_head_without_layer_checks(census_dir):
    one_line_error(attnprobe("figures", census_dir, "--prompt", "  "), "--prompt is empty")
    one_line_error(attnprobe("figures", census_dir, "--prompt", "a b", "--kernel", "elu"), "--kernel compares one head")
