"""A long offline prose file for haystacks past the embedded prose's 10K-token census range.

    python benchmarks/long_prose.py OUT.txt [--min-chars N]

The standard library's documentation (pydoc_data) holds about 32K tokens; a 32K-window model's NIAH
needs a haystack of 32K tokens in its census range alone. This collects the docstrings of the standard
library's Python sources (read with `ast`, nothing imported or run), keeps the paragraphs that read as
sentences (the same filter as the embedded prose), in a fixed order, and writes them one per line. The
file differs between Python versions: its sha256 goes with any result measured on it.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import sys
import sysconfig
from pathlib import Path

from attnprobe.probe.texts import _is_prose, _paragraphs


def docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--min-chars", type=int, default=600_000, help="refuse a result shorter than this")
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen, kept = set(), []
    for file in sorted(stdlib.rglob("*.py")):
        if any(part in ("site-packages", "test", "tests", "idlelib") for part in file.relative_to(stdlib).parts):
            continue
        for doc in docstrings(file.read_text(encoding="utf-8", errors="replace")):
            for paragraph in _paragraphs(doc):
                if _is_prose(paragraph) and paragraph not in seen:
                    seen.add(paragraph)
                    kept.append(paragraph)
    text = "\n".join(kept) + "\n"
    if len(text) < args.min_chars:
        print(f"only {len(text):,} characters of prose found under {stdlib}: a shorter file than asked for", file=sys.stderr)
        return 2
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(kept):,} paragraphs, {len(text):,} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
