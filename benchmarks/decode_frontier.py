"""The decode frontier figure from decode_bench's rows and a matrix run's recall (analyses/efficiency/frontier.py).

    python benchmarks/decode_frontier.py RESULTS/decode_bench.json RUN/recall.parquet --context 32768 --batch 8 --out DIR

Writes DIR/decode_frontier.png and .svg, and DIR/decode_frontier.csv (the points drawn).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from attnprobe.analyses.efficiency.frontier import decode_frontier, frontier_points
from attnprobe.analyses.presentation import style
from attnprobe.errors import AttnprobeError


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", help="decode_bench.json")
    parser.add_argument("recall", help="recall.parquet of a swap --matrix run")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        rows = pd.DataFrame(json.loads(Path(args.rows).read_text())["rows"])
        recall = pd.read_parquet(args.recall)
    except (OSError, KeyError, ValueError) as error:
        raise AttnprobeError(f"cannot read {args.rows} or {args.recall} ({error}): pass decode_bench.json and recall.parquet") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frontier_points(rows, recall, args.context, args.batch).to_csv(out / "decode_frontier.csv", index=False)
    return style.save(decode_frontier(rows, recall, args.context, args.batch), out, "decode_frontier")


if __name__ == "__main__":
    try:
        print("\n".join(str(path) for path in main()))
    except AttnprobeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
