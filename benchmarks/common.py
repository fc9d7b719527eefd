"""Shared helpers of the CPU benchmarks: wall-clock timing, peak resident memory, machine facts, tables.

Peak memory is read from the kernel, not from torch: a configuration runs in a fresh process,
which resets its high-water mark (VmHWM) once the model is loaded, so the peak reported is what
the configuration itself added on top of the loaded model.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULT_PREFIX = "BENCH-RESULT "
ROOT = Path(__file__).resolve().parents[1]


# ---- memory ----------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


class PeakMemory:
    """Peak RSS above a baseline. `reset()` makes the current RSS the baseline and clears the peak."""

    def __init__(self) -> None:
        self.baseline_kib = 0
        self.exact = True  # False: the peak could not be cleared, so it may include earlier work

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.exact = False
        self.baseline_kib = _status_kib("VmRSS") or 0

    def peak_mb(self) -> float:
        peak_kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(peak_kib - self.baseline_kib, 0) / 1024

    @staticmethod
    def rss_mb() -> float:
        return (_status_kib("VmRSS") or 0) / 1024


def available_mb() -> float:
    """MemAvailable of the machine, MB (what can be allocated without swapping or the OOM killer)."""
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


# ---- timing ----------------------------------------------------------------------------------

def time_runs(fn: Callable[[], object], max_runs: int = 3, budget_s: float = 30.0) -> tuple[float, list[float]]:
    """(first-run seconds, steady runs in seconds). The first run warms up; more runs follow while the budget lasts.

    When the first run alone uses the budget there are no steady runs: `median_s` then falls back to it."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    steady, spent = [], first
    while len(steady) < max_runs - 1 and spent + (statistics.median(steady) if steady else first) <= budget_s:
        start = time.perf_counter()
        fn()
        steady.append(time.perf_counter() - start)
        spent += steady[-1]
    return first, steady


def median_s(first: float, steady: list[float]) -> float:
    return statistics.median(steady) if steady else first


# ---- child processes -------------------------------------------------------------------------

def emit(result: dict) -> None:
    """Print a child's result as the one line the parent parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: Path, spec: dict, timeout_s: float | None = None) -> dict:
    """Run `script --child SPEC` in a fresh interpreter and return the dict it emitted (or an error entry)."""
    command = [sys.executable, str(script), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
    return {**spec, "error": tail[0][:200]}


# ---- machine and tables ----------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(threads: int) -> dict:
    import torch

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "nproc": os.cpu_count(),
            "torch_threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "memory_available_mb": round(available_mb()), "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def header(title: str, facts: dict, command: str) -> str:
    return (f"## {title}\n\n`{command}`\n\n"
            f"{facts['date']}, {facts['cpu']}, nproc {facts['nproc']}, torch {facts['torch']} with "
            f"{facts['torch_threads']} thread(s) per process, {facts['memory_available_mb']} MB available; "
            f"load average (1/5/15 min) at start {facts['loadavg_start']}")
