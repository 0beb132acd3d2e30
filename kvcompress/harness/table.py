"""``python -m kvcompress.harness.table RESULTS [--command CMD]``: the ``eval=lm_eval`` records of a results
folder as one markdown table (caches x task metrics), written to ``RESULTS/README.md``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcompress.records import read_records, record_settings

COLUMNS = {  # metric key -> column title
    "kvc_wikitext2/word_perplexity": "wikitext2 word ppl ↓",
    "kvc_wikitext2/bits_per_byte": "wikitext2 bits/byte ↓",
    "kvc_tinystories_cloze/acc": "cloze acc ↑",
    "kvc_tinystories_cloze/acc_norm": "cloze acc_norm ↑",
    "kvc_passkey/acc": "passkey acc ↑",
}
# No compression_ratio column: the harness batches right-padded rows of different lengths, so the record's memory
# report (taken at the batch with the most real tokens) counts padding slots in kv_bytes but not in the fp16
# reference, and the ratio mixes that padding share with the cache's own compression (full fp32 showed 0.33x).


def label(record: dict) -> str:
    """The cache name plus the settings that differ from its presets (conf/<axis>/<name>.yaml; all of an old
    record's settings)."""
    changed = record_settings(record)
    return f"{record['cache']} ({', '.join(changed.split())})" if changed else record["cache"]


def fmt(value) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def table(records: list[dict]) -> str:
    latest: dict[str, dict] = {}
    for r in records:  # the last record per cache label wins
        if r.get("eval") == "lm_eval" or any(k.startswith("kvc_") for k in r.get("metrics", {})):
            latest[label(r)] = r
    cols = [c for c in COLUMNS if any(c in r["metrics"] for r in latest.values())]
    lines = ["| cache | " + " | ".join(COLUMNS[c] for c in cols) + " | status |",
             "|---|" + "---:|" * len(cols) + "---|"]
    for name, r in latest.items():
        m = r["metrics"]
        lines.append(f"| {name} | " + " | ".join(fmt(m.get(c)) for c in cols) + f" | {r['status']} |")
    sizes = {k.split("/")[0]: int(v) for r in latest.values() for k, v in r["metrics"].items()
             if k.endswith("/n_samples")}
    note = ", ".join(f"{t}: {n}" for t, n in sorted(sizes.items()))
    return "\n".join(lines) + (f"\n\nExamples per task: {note}." if note else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvcompress.harness.table", description=__doc__)
    p.add_argument("results", type=Path)
    p.add_argument("--command", default=None, help="the command that produced the records (named in the README)")
    p.add_argument("--intro", default="", help="text placed above the table")
    args = p.parse_args(argv)
    path = args.results / "records.jsonl"
    if not path.is_file():
        print(f"error: {path} not found", file=sys.stderr)
        return 1
    records = read_records(path)  # a corrupt line is reported (file:line), not fatal
    body = ["# lm-eval harness tasks with the compressed cache in the loop", "", args.intro, "", table(records), ""]
    if args.command:
        body += ["Produced by:", "", "```", args.command, "```", ""]
    (args.results / "README.md").write_text("\n".join(body))
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
