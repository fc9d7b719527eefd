"""The command line, driven as a user drives it, on a tiny local model directory."""
import json

import pandas as pd
import pytest

from tiny_hf import attnprobe



@pytest.fixture(scope="module")
def census_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "census"
    result = attnprobe("census", "--model", tiny, "--out", out, "--lengths", "128", "--depths", "0.5", "--needles", "1",
                       "--sink-sequences", "8", "--prose-length", "96")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_help_lists_every_command():
    result = attnprobe("--help")
    assert result.returncode == 0
    for command in ("info", "census", "ablate", "swap", "figures"):
        assert command in result.stdout


def test_info_prints_the_model_facts(tiny):
    result = attnprobe("info", "--model", tiny)
    assert result.returncode == 0, result.stderr
    assert "n_layers" in result.stdout and "n_kv_heads" in result.stdout


def test_global_options_load_with_a_device_map_and_a_dtype(tiny):
    result = attnprobe("--device-map", "auto", "--dtype", "bfloat16", "--torch-kernels", "info", "--model", tiny)
    assert result.returncode == 0, result.stderr[-2000:]
    from attnprobe.hooks.model import load_model

    import torch
    model = load_model(str(tiny), dtype=torch.bfloat16, device_map="auto")
    assert model.device.type == "cpu" and next(model.hf.parameters()).dtype == torch.bfloat16  # no GPU here: all on the CPU
    assert model.hf(input_ids=torch.tensor([[1, 5, 9]])).logits.shape[:2] == (1, 3)


def test_census_writes_a_complete_run_directory(census_dir):
    out, stdout = census_dir
    for name in ("manifest.json", "heads.parquet", "sink_rate.json", "sinks.parquet", "secondary_sinks.parquet",
                 "massive.parquet", "massive_layers.parquet", "massive_intervention.parquet", "niah_samples.jsonl",
                 "retrieval_heads.json"):
        assert (out / name).exists(), name
    heads = pd.read_parquet(out / "heads.parquet")
    assert len(heads) == 2 * 4
    assert {"retrieval_score", "alpha_1", "prev_token_score", "induction_score", "kv_head", "layer_type", "roles"} <= set(heads.columns)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bos"] in (True, False) and manifest["info"]["n_heads"] == 4
    assert "sink rate" in stdout and "induction heads" in stdout
    assert len(json.loads((out / "retrieval_heads.json").read_text())) == 8


def test_rerunning_a_finished_census_recomputes_nothing_and_other_settings_are_refused(tiny, census_dir):
    out, _ = census_dir
    before = pd.read_parquet(out / "heads.parquet")
    again = attnprobe("census", "--model", tiny, "--out", out, "--lengths", "128", "--depths", "0.5", "--needles", "1",
                      "--sink-sequences", "8", "--prose-length", "96")
    assert again.returncode == 0, again.stderr[-2000:]
    pd.testing.assert_frame_equal(before, pd.read_parquet(out / "heads.parquet"))
    other = attnprobe("census", "--model", tiny, "--out", out, "--lengths", "256")
    assert other.returncode == 2 and "other settings" in other.stderr


def test_figures_and_report(census_dir):
    out, _ = census_dir
    result = attnprobe("figures", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "report.html").exists()
    assert list((out / "figures").glob("*.png"))


def test_ablate_and_swap_run_and_write_tables(tiny, census_dir, tmp_path):
    census, _ = census_dir
    ablate = attnprobe("ablate", "--model", tiny, "--heads", "top:2:induction_score", "--from", census, "--mode", "zero",
                       "--task", "passkey", "--lengths", "96", "--depths", "0.5", "--allow-small", "--out", tmp_path / "ablate")
    assert ablate.returncode == 0, ablate.stderr[-2000:]
    small = attnprobe("ablate", "--model", tiny, "--heads", "0.0", "--task", "passkey", "--lengths", "96", "--depths", "0.5",
                      "--out", tmp_path / "small")
    assert small.returncode == 2 and "2 samples" in small.stderr and "--allow-small" in small.stderr
    assert set(pd.read_parquet(tmp_path / "ablate" / "ablation.parquet")["selection"]) == {"none", "chosen"}
    swap = attnprobe("swap", "--model", tiny, "--matrix", "--variants", "original,all-elu,sink+window+linear", "--quick",
                     "--no-census", "--out", tmp_path / "swap")
    assert swap.returncode == 0, swap.stderr[-2000:]
    matrix = pd.read_parquet(tmp_path / "swap" / "matrix.parquet")
    assert list(matrix["architecture"]) == ["original", "all-elu", "sink+window+linear"]
    assert matrix.set_index("architecture").loc["all-elu", "state_bytes_per_token"] == 0
    assert matrix.set_index("architecture").loc["original", "state_bytes_per_token"] == 2 * 2 * 2 * 16 * 2
    assert (tmp_path / "swap" / "fits" / "sink_window_linear" / "params.safetensors").exists()
    measured = matrix.set_index("architecture")  # the measured efficiency columns, at the quick context (64)
    assert (measured["decode_tokens_per_s_64"] > 0).all() and (measured["prefill_ms_64"] > 0).all()
    assert measured.loc["all-elu", "kv_cache_bytes_measured_64"] < measured.loc["original", "kv_cache_bytes_measured_64"]


def test_a_rerun_sweep_reuses_its_saved_cells(tiny, census_dir, tmp_path):
    census, _ = census_dir
    args = ("ablate", "--model", tiny, "--sweep", "1", "--seeds", "2", "--from", census, "--task", "niah",
            "--lengths", "96", "--depths", "0.5", "--allow-small", "--out", tmp_path / "sweep")
    first = attnprobe(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    cells = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "sweep_cells").glob("*.parquet")}
    assert set(cells) == {"original.parquet", "top-1.parquet", "random-1-s0.parquet", "random-1-s1.parquet"}
    before = pd.read_parquet(tmp_path / "sweep" / "ablation.parquet")
    texts = json.loads((tmp_path / "sweep" / "manifest.json").read_text())["texts"]
    again = attnprobe(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "sweep_cells").glob("*.parquet")} == cells
    pd.testing.assert_frame_equal(before, pd.read_parquet(tmp_path / "sweep" / "ablation.parquet"))
    assert texts and json.loads((tmp_path / "sweep" / "manifest.json").read_text())["texts"] == texts  # the resumed cells' ranges
    other = attnprobe(*args[:-2], "--mode", "zero", "--out", tmp_path / "sweep")
    assert other.returncode == 2 and "other settings" in other.stderr


@pytest.mark.parametrize("args, message", [
    (["info", "--model", "/no/such/model.gguf"], "not found"),
    (["info", "--model", "nonsense-model"], "is not an embedded model"),
    (["swap", "--kernel", "cosine", "--layers", "0"], "unknown kernel 'cosine'"),
    (["ablate", "--heads", "99.0"], "layer 99 is out of range"),
    (["census", "--lengths", "9000"], "does not fit the model's window"),
    (["--dtype", "float8", "info"], "unknown --dtype 'float8'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, args, message):
    if args[0] not in ("info", "--dtype"):
        args = args[:1] + ["--model", str(tiny)] + args[1:]
    result = attnprobe(*args)
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_tokenizer_follows_the_bos_flag_of_the_gguf(tiny):
    """Some transformers releases drop `tokenizer.ggml.add_bos_token` when converting a GGUF tokenizer."""
    from transformers import AutoTokenizer

    from attnprobe.hooks.model import _follow_gguf_bos

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert tokenizer("a").input_ids[0] != tokenizer.bos_token_id
    _follow_gguf_bos(tokenizer, None)  # no flag in the file: the tokenizer's own convention stays
    assert tokenizer("a").input_ids[0] != tokenizer.bos_token_id
    _follow_gguf_bos(tokenizer, True)
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    _follow_gguf_bos(tokenizer, False)
    assert tokenizer("a").input_ids[0] != tokenizer.bos_token_id


def test_embedded_gguf_bos_flags_are_read():
    from attnprobe.hooks.model import _check_gguf, embedded_gguf_path

    assert _check_gguf(embedded_gguf_path("smollm2-135m")) is False


def test_corrupt_or_truncated_gguf_is_named(tmp_path):
    from attnprobe.hooks.model import embedded_gguf_path

    truncated = tmp_path / "truncated.gguf"
    with open(embedded_gguf_path("smollm2-135m"), "rb") as source:
        truncated.write_bytes(source.read(1_000_000))
    empty_header = tmp_path / "header-only.gguf"
    empty_header.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 40)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    for path, message in ((truncated, "corrupt or truncated"), (empty_header, "general.architecture"), (not_gguf, "not a GGUF file")):
        result = attnprobe("info", "--model", path)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert path.name in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_figures_draw_attention_maps_of_a_prompt(census_dir):
    out, _ = census_dir
    result = attnprobe("figures", out, "--prompt", "The cat sat on the mat. The cat", "--layer", "1", "--head", "2",
                       "--kernel", "elu", "--format", "png")
    assert result.returncode == 0, result.stderr[-2000:]
    for stem in ("attention_L1", "attention_L1H2", "attention_L1H2_elu"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000
    assert "Attention maps" in (out / "report.html").read_text()
    bad = attnprobe("figures", out, "--prompt", "x", "--layer", "7")
    assert bad.returncode == 2 and "layer 7 is out of range" in bad.stderr
