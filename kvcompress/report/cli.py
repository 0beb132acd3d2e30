"""``kvc-report RESULTS [--out DIR]``: rebuild summary.csv, summary.md and the plots from run records;
``kvc-report --table FOLDER``: write the tables (README.md...) that FOLDER/table.yaml describes from its records."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcompress.report import build_report
from kvcompress.report.table import load, rows
from kvcompress.report.tables import SPEC_FILE, build_tables


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvc-report", description=__doc__.split(": ", 1)[-1].split(";")[0])
    p.add_argument("source", type=Path, help="records.jsonl, a results folder, or a Hydra sweep folder")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: the source folder)")
    p.add_argument("--command", default=None, help="the sweep command to name in summary.md")
    p.add_argument("--code-version", default=None, help="the code version whose records make the table (default: "
                   "the current code's, else the newest records')")
    p.add_argument("--table", action="store_true", help=f"write the documents of SOURCE/{SPEC_FILE} (a results "
                   "folder's tables) instead of summary.md")
    p.add_argument("--spec", type=Path, default=None, help=f"with --table: the spec (default SOURCE/{SPEC_FILE}), "
                   "e.g. a results folder's spec over records written elsewhere")
    args = p.parse_args(argv)
    if args.spec and not args.table:
        p.error("--spec goes with --table")
    if args.table:
        try:
            paths = build_tables(args.source, args.out, args.spec)
        except (OSError, ValueError) as e:  # SpecError is a ValueError: it names the spec and the expression
            print(f"kvc-report: error: {e}", file=sys.stderr)
            return 1
        print("kvc-report: wrote " + ", ".join(str(p) for p in paths))
        return 0
    try:
        records = load(args.source)
        if not records:
            print(f"kvc-report: error: no run records under {args.source}", file=sys.stderr)
            return 1
        table = rows(records, args.code_version)
        paths = build_report(args.source, args.out, args.command, records, args.code_version)
    except (OSError, ValueError) as e:
        print(f"kvc-report: error: {e}", file=sys.stderr)
        return 1
    count = {s: sum(r["status"] == s for r in table) for s in ("ok", "missing")}
    failed, warned = len(table) - sum(count.values()), sum(bool(r.get("warning")) for r in table)
    notes = [f"{failed} failed", f"{count['missing']} missing"] + ([f"{warned} with a warning"] if warned else [])
    corrupt = f"; {len(records.corrupt)} corrupt line(s) skipped (see summary.md)" if records.corrupt else ""
    print(f"kvc-report: code version {table.version} ({table.why}): {count['ok']} ok run(s) ({', '.join(notes)})"
          f"{corrupt} -> " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
