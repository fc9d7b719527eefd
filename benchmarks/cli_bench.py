"""Wall time of the CLI's help, each in a fresh interpreter as a user runs it (median of --repeats runs).

    python benchmarks/cli_bench.py [--repeats 5] [--src DIR] [--out results.json]

Measures `attnprobe --help` and `attnprobe census --help` (as `python -m attnprobe.analyses.cli`, what the
console script runs), and lists which of torch, transformers and pandas each imported (none should: the help
is built from torch-free config dataclasses and name lists). --src runs another checkout's src/ (e.g. an older
commit's) for a before/after comparison on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

COMMANDS = (("--help",), ("census", "--help"))
HEAVY = ("torch", "transformers", "pandas")


def measure(args: tuple[str, ...], repeats: int, env: dict) -> dict:
    command = [sys.executable, "-m", "attnprobe.analyses.cli", *args]
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
        seconds.append(time.perf_counter() - start)
    traced = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True, env=env)
    imported = {line.split("|")[-1].strip() for line in traced.stderr.splitlines() if line.startswith("import time:")}
    return {"command": "attnprobe " + " ".join(args), "median_s": round(statistics.median(seconds), 3),
            "runs_s": [round(s, 3) for s in seconds], "heavy_imports": sorted(set(HEAVY) & imported)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--src", type=Path, default=common.ROOT / "src", help="the src/ directory whose attnprobe is timed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    rows = [measure(command, args.repeats, env) for command in COMMANDS]
    print("| command | median wall time (s) | runs (s) | torch/transformers/pandas imported |\n|---|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.3f} | {', '.join(map(str, row['runs_s']))} | {', '.join(row['heavy_imports']) or 'none'} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"src": str(args.src), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                                        "load_average": os.getloadavg(), "rows": rows,
                                        "invocation": "python benchmarks/cli_bench.py " + " ".join(sys.argv[1:])}, indent=2))


if __name__ == "__main__":
    main()
