"""results/axes/records.jsonl -> results/axes/README.md: every combination of the three axes, and whether the
compression ratios multiply (the measured ratio of a combination against the product of its axes' own factors).

    bash results/axes/run.sh          # runs the jobs, then this script
    python results/axes/table.py      # the table alone, from the records
"""
from __future__ import annotations

import sys
from pathlib import Path

from kvcompress.report.table import latest, load

HERE = Path(__file__).resolve().parent
AXES = ("storage", "policy", "layout")
IDENTITY = {"storage": "dense", "policy": "none", "layout": "per_layer"}

HEADER = """# The three axes on SmolLM2-135M

Every combination of storage x policy x layout that `bash results/axes/run.sh` runs: the four commands of the axes
redesign, the last one the Cartesian product `kvc -m storage=dense,int4,kivi policy=none,h2o,snapkv
layout=per_layer,cla policy.budget=0.25` in one line. Perplexity with the cache in the loop on WikiText-2 (2 windows
of 1024 tokens, 16 tokens per step), fp32 model on a 2-core CPU; written by `python results/axes/table.py` from
`records.jsonl` (code version{versions}).

`factor` of an axis is the ratio of that axis alone over the full cache's; `predicted` is the full cache's ratio times
the factors of the combination's axes. Where bytes scale with the tokens kept, the measured ratio is the product
(`measured / predicted` ~ 1: H2O at 25% over int4 holds 3.9x less than int4 alone). Two things do not scale, and the
table shows by how much: KIVI keeps its most recent `residual` (128) tokens in fp16 whatever the budget, so under a
policy that keeps 256 tokens half of them are full precision (~0.5); SnapKV keeps the attention rows of its 32-query
window in fp32 as per-token state (counted in `kv_bytes`), large next to int4/KIVI codes (~0.4-0.7). CLA with
uniform pairs from layer 0 (the Cartesian product's `layout=cla` default) is the configuration that destroys this
model (results/sharing); `groups=auto` is the usable one.

"""


def key(r: dict) -> tuple:
    return tuple(r.get(a) for a in AXES)


def main(folder: Path = HERE) -> None:
    records = [r for r in latest(load(folder / "records.jsonl")) if r.get("status") == "ok" and r.get("storage")]
    product = [r for r in records if r["policy_params"].get("budget") in (0.25, None) or r["policy"] == "none"]
    full = next(r for r in product if key(r) == ("dense", "none", "per_layer"))
    base = full["metrics"]["compression_ratio"]
    alone = {}
    for r in product:
        changed = [a for a in AXES if r[a] != IDENTITY[a]]
        if len(changed) == 1 and not r["layout_params"].get("groups"):
            alone[(changed[0], r[changed[0]])] = r["metrics"]["compression_ratio"] / base
    lines = ["| storage | policy | layout | settings | ppl | Δppl | ratio | predicted | measured / predicted |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["layout"], r["policy"], r["storage"])):
        m = r["metrics"]
        factors = [alone.get((a, r[a])) for a in AXES if r[a] != IDENTITY[a]]
        predicted = base
        for f in factors:
            predicted = None if f is None or predicted is None else predicted * f
        settings = " ".join(f"{k}={v}" for k, v in r["cache_params"].items() if shown(r, k, v))
        lines.append(f"| {r['storage']} | {r['policy']} | {r['layout']} | {settings} | {m['ppl']:.3f} | "
                     f"{m['ppl'] - full['metrics']['ppl']:+.3f} | {m['compression_ratio']:.2f}x | "
                     + (f"{predicted:.2f}x | {m['compression_ratio'] / predicted:.2f} |" if predicted else "| |"))
    versions = sorted({str(r.get("code_version")) for r in records})
    text = HEADER.format(versions=("s " if len(versions) > 1 else " ") + ", ".join(versions)) + "\n".join(lines)
    (folder / "README.md").write_text(text + "\n")
    print(text)


def shown(r: dict, key: str, value) -> bool:
    """Settings that change the row: not an ignored budget of policy=none, not CLA's auto-only settings."""
    axis = key.split(".", 1)[0]
    if value is None or key not in SHOWN or r[axis] == IDENTITY[axis]:
        return False
    auto = r["layout_params"].get("groups") == "auto"
    return not ((key == "layout.share_fraction" and not auto)
                or (key in ("layout.group_size", "layout.start_layer") and auto))


SHOWN = ("storage.bits", "storage.rank_fraction", "storage.joint_kv", "policy.budget", "layout.start_layer",
         "layout.groups", "layout.share_fraction", "layout.group_size")

if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:]))
