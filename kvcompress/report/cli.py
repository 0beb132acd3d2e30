"""``kvc-report RESULTS [--out DIR]``: rebuild summary.csv, summary.md and the plots from run records."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcompress.report import build_report
from kvcompress.report.table import load, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvc-report", description=__doc__.split(": ", 1)[-1])
    p.add_argument("source", type=Path, help="records.jsonl, a results folder, or a Hydra sweep folder")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: the source folder)")
    p.add_argument("--command", default=None, help="the sweep command to name in summary.md")
    args = p.parse_args(argv)
    try:
        records = load(args.source)
        table = rows(records)
        if not table:
            print(f"kvc-report: error: no run records under {args.source}", file=sys.stderr)
            return 1
        paths = build_report(args.source, args.out, args.command, records)
    except (OSError, ValueError) as e:
        print(f"kvc-report: error: {e}", file=sys.stderr)
        return 1
    failed = sum(r["status"] != "ok" for r in table)
    corrupt = f"; {len(records.corrupt)} corrupt line(s) skipped (see summary.md)" if records.corrupt else ""
    print(f"kvc-report: {len(table)} run(s) ({failed} failed){corrupt} -> " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
