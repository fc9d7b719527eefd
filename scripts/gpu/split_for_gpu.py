"""Split the Qwen2.5-Coder GGUF into pieces that travel to the GPU machine one call each.

    python scripts/gpu/split_for_gpu.py [--gguf PATH] [--root /work/main]

A device call carries the working tree plus at most 8 carried paths, 64 MiB in all, and the machine keeps
/tmp only while it stays warm (30 s between calls). This writes the GGUF (checked against its sha256) as
equal pieces into the git-ignored folders ROOT/.m1, .m2, ... sized so that each call's load (working tree +
one piece, and the `gguf` wheel in .m1) stays under 64 MiB, puts `qwen.manifest` (size, sha256, piece
names) beside the first piece, and prints the calls to make: `bash scripts/gpu/gpu_qwen.sh piece` once per
folder, back to back, then `setup`, `census` and `stats` (see gpu_qwen.sh).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALL_LIMIT = 64 * 2 ** 20
MARGIN = 2 * 2 ** 20  # files the main session adds between splitting and sending
MAX_FOLDERS = 12


def travelling_bytes(root: Path) -> int:
    """Tracked files plus untracked files git does not ignore: what every device call sends."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def gguf_wheel(into: Path) -> Path:
    import gguf  # noqa: F401  (the version installed here is the one transformers was tested with)
    from importlib.metadata import version

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "-d", str(into), f"gguf=={version('gguf')}"], check=True)
    return next(into.glob("gguf-*.whl"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="the assembled GGUF (default: attnprobe's cached copy)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout the device calls send")
    args = parser.parse_args()
    from attnprobe.hooks.embedded import MODELS, embedded_gguf_path, file_sha256

    model = MODELS["qwen2.5-coder-0.5b"]
    source = args.gguf or embedded_gguf_path(model.name)
    if source.stat().st_size != model.size or file_sha256(source) != model.sha256:
        print(f"{source} is not the Qwen2.5-Coder GGUF ({model.size} bytes, sha256 {model.sha256[:16]})")
        return 2
    root = args.root.resolve()
    for old in root.glob(".m*"):
        if old.is_dir() and old.name[2:].isdigit():
            shutil.rmtree(old)
    first = root / ".m1"
    first.mkdir()
    wheel = gguf_wheel(first)
    room = CALL_LIMIT - travelling_bytes(root) - MARGIN - wheel.stat().st_size
    count = math.ceil(model.size / room)
    if count > MAX_FOLDERS:
        print(f"the working tree leaves {room / 2 ** 20:.1f} MiB a call: too little to send the model")
        return 2
    size = math.ceil(model.size / count)
    names = []
    with open(source, "rb") as handle:
        for i in range(1, count + 1):
            folder = root / f".m{i}"
            folder.mkdir(exist_ok=True)
            name = f"qwen.part{i:02d}"
            data = handle.read(size)
            (folder / name).write_bytes(data)
            names.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (first / "qwen.manifest").write_text(json.dumps({"file": model.filename, "size": model.size, "sha256": model.sha256,
                                                     "pieces": names, "wheel": wheel.name}, indent=1))
    folders = [f".m{i}/x" for i in range(1, count + 1)]
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore"] + folders, capture_output=True, text=True).stdout
    if len(ignored.split()) != len(folders):
        print("warning: some .mN folders are not git-ignored here; they would travel with every call")
    print(f"{count} pieces of {size / 2 ** 20:.1f} MiB in {', '.join(f'.m{i}' for i in range(1, count + 1))} "
          f"(working tree {travelling_bytes(root) / 2 ** 20:.1f} MiB). Calls, back to back (< 30 s apart):")
    for i in range(1, count + 1):
        print(f"  run(command='bash scripts/gpu/gpu_qwen.sh piece', carry=['.m{i}'])")
    print("  run(command='bash scripts/gpu/gpu_qwen.sh setup census', timeout_s=600)")
    print("  run(command='bash scripts/gpu/gpu_qwen.sh census', timeout_s=600)   # again while it says 'resume'")
    print("  run(command='bash scripts/gpu/gpu_qwen.sh stats', timeout_s=600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
