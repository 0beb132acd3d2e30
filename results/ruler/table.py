"""Markdown table and plot of the eval=ruler records in results/ruler/records.jsonl (written by run.sh).

    .venv/bin/python results/ruler/table.py > results/ruler/README.md     # also writes acc_vs_ratio.png

Every figure comes from a record: accuracy with its bootstrap 95% interval per protocol, per task, and the
compression ratio against the fp16 reference (the full cache in fp32 reads ~0.5x).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOCOLS = ("query_aware", "query_agnostic")
INFORMATIVE = 0.5  # the full cache's accuracy on a task above which a drop under compression means something


def load(path: Path = HERE / "records.jsonl") -> list[dict]:
    """Ok eval=ruler records with protocol=both, the last one of each config (a re-run replaces an earlier one)."""
    latest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "ok" and r["eval"] == "ruler" and r["eval_params"]["protocol"] == "both":
            latest[r["config_hash"]] = r
    return sorted(latest.values(), key=lambda r: (label(r) != "full", -r["metrics"]["compression_ratio"]))


def label(r: dict) -> str:
    storage, policy = r.get("storage", "dense"), r.get("policy", "none")
    if storage == "dense" and policy == "none":
        return "full"
    bits = (r.get("storage_params") or {}).get("bits")
    storage = f"{storage}-{bits}" if bits and storage != "dense" else storage
    parts = [p for p in (policy if policy != "none" else "", storage if storage != "dense" else "") if p]
    budget = (r.get("policy_params") or {}).get("budget")
    return " + ".join(parts) + (f" {budget:g}" if policy != "none" and budget is not None else "")


def tasks(r: dict) -> list[str]:
    return list(r["eval_params"]["tasks"])


def interval(m: dict, key: str) -> str:
    if key not in m:
        return "–"
    return f"{m[key]:.2f} [{m[key + '/ci_low']:.2f}, {m[key + '/ci_high']:.2f}]"


def markdown(records: list[dict]) -> str:
    ts = tasks(records[0])
    p = records[0]["eval_params"]
    head = ["cache", "ratio", *[f"{q} acc" for q in PROTOCOLS], *[f"{t} (aware / agnostic)" for t in ts]]
    lines = [f"Model {records[0]['model']}, lengths {p['lengths']}, {p['samples']} samples per task and length, "
             f"chat={p['chat']}, max_new_tokens={p['max_new_tokens']}, haystack {p['haystack']}, seed "
             f"{records[0]['seed']}. Accuracy = RULER's all-of string match, mean over samples, with its bootstrap "
             "95% interval; ratio = fp16 reference bytes / bytes held (the fp32 full cache reads ~0.5).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        row = [label(r), f"{m['compression_ratio']:.2f}"]
        row += [interval(m, f"{q}/accuracy") for q in PROTOCOLS]
        row += [" / ".join(f"{m.get(f'{q}/{t}/all/acc', float('nan')):.2f}" for q in PROTOCOLS) for t in ts]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"{p['samples']} samples per cell: the intervals are wide, and two caches whose intervals overlap "
              "are not told apart by this run. Policies compress once at prefill end (`policy.when` in the records); "
              "their ratio counts the question and answer tokens held after compression."]
    full = next((r for r in records if label(r) == "full"), None)
    if full is not None:
        lines += ["", "Is each task informative on this model (full cache, query-aware, >= "
                  f"{INFORMATIVE:.0%})?", ""]
        for t in ts:
            acc = full["metrics"].get(f"query_aware/{t}/all/acc", float("nan"))
            verdict = "yes" if acc >= INFORMATIVE else "no: the model fails it even with every token kept"
            lines.append(f"- `{t}`: {acc:.2f} -> {verdict}")
    return "\n".join(lines)


def plot(records: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for q, marker, shift in zip(PROTOCOLS, ("o", "s"), (-0.02, 0.02), strict=True):
        xs = [r["metrics"]["compression_ratio"] + shift for r in records]  # side by side, not on top
        ys = [r["metrics"][f"{q}/accuracy"] for r in records]
        err = [[y - r["metrics"][f"{q}/accuracy/ci_low"] for y, r in zip(ys, records, strict=True)],
               [r["metrics"][f"{q}/accuracy/ci_high"] - y for y, r in zip(ys, records, strict=True)]]
        ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=3, label=q.replace("_", "-"), alpha=0.8)
        for x, y, r in zip(xs, ys, records, strict=True):
            if q == PROTOCOLS[0]:
                ax.annotate(label(r), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("compression ratio (fp16 reference / bytes held)")
    ax.set_ylabel("RULER accuracy (95% bootstrap CI)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"eval=ruler, {records[0]['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    records = load()
    if not records:
        sys.exit("no ok eval=ruler records in results/ruler/records.jsonl: run results/ruler/run.sh first")
    plot(records, HERE / "acc_vs_ratio.png")
    print("# eval=ruler results\n\nRe-run: `bash results/ruler/run.sh` (records), then "
          "`.venv/bin/python results/ruler/table.py > results/ruler/README.md` (this file and acc_vs_ratio.png).\n")
    print(markdown(records))
    print("\n![accuracy against compression ratio](acc_vs_ratio.png)")
    print("\n[Why KIVI-2 scores 0 here](kivi2.md): not a bug; 2-bit per-channel keys are too coarse for this model to "
          "copy the needle (`results/ruler/kivi_check.py`).")


if __name__ == "__main__":
    main()
