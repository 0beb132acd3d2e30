"""results/quant/storages/README.md and results/lowrank/xkv/README.md (+ ppl-vs-ratio plots) from the records that
scripts/storages_sweep.sh wrote (issue 17: KVQuant, GEAR, ThinK, xKV).

    python scripts/storages_table.py

Records carry ``storage``, ``layout`` and ``cache_params`` with keys like ``storage.bits``; a row's label comes
from those. Delta ppl is against the ``full`` row (results/quant/storages; same window, chunk and calibration text).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = {"quant": ROOT / "results/quant/storages", "xkv": ROOT / "results/lowrank/xkv"}


def label(r: dict) -> str:
    p = {k.split(".", 1)[1]: v for k, v in r["cache_params"].items() if k.startswith("storage.")}
    q = {k.split(".", 1)[1]: v for k, v in r["cache_params"].items() if k.startswith("layout.")}
    s = r.get("storage", r["cache"])
    if r["cache"] == "full":
        return "full (dense fp32)"
    if s == "kvquant":
        out = f"{p['outlier_fraction']:.0%} outliers" if p["outlier_fraction"] else "no outliers"
        return f"KVQuant-{p['bits']} ({out}, nuq, {p['keys']} keys)"
    if s == "kivi":
        return f"KIVI-{p['bits']} g{p['group_size']} r{p['residual']}"
    if s == "gear":
        return (f"GEAR {p['bits']}-bit g{p['group_size']} block {p['block_size']} rank {p['rank']} "
                f"{p['outlier_fraction']:.0%} outliers r{p['residual']}")
    if s == "think":
        base = f"ThinK {p['prune_fraction']:.0%} pruned"
        return base + (f" over KIVI-{p['bits']} g{p['group_size']} r{p['residual']}" if p["bits"] else " (fp16)")
    if s == "latent":
        lay = f", xKV groups of {q['group_size']}" if r.get("layout") == "xkv" else ", per-layer basis"
        return f"latent K+V rank {p['rank_fraction']}{lay}"
    return s


def rows(path: Path) -> list[dict]:
    recs = {}
    for line in (path / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "ok" and r["eval"] == "ppl":
            recs[label(r)] = r  # the latest record of a setting
    return list(recs.values())


def table(recs: list[dict], full: float) -> str:
    out = ["| cache | ppl | Δppl | ratio (measured) | kv MB | calib KB | windows x tokens |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: (r["cache"] != "full", -r["metrics"]["compression_ratio"])):
        m, e = r["metrics"], r["eval_params"]
        out.append(f"| {label(r)} | {m['ppl']:.3f} | {100 * (m['ppl'] / full - 1):+.1f}% | "
                   f"{m['compression_ratio']:.2f}x | {m['kv_bytes'] / 1e6:.2f} | {m['calibration_bytes'] / 1e3:.1f} | "
                   f"{e['max_windows']} x {e['window']} |")
    return "\n".join(out)


def plot(recs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in recs:
        if r["cache"] == "full":
            ax.axhline(r["metrics"]["ppl"], color="gray", ls="--", lw=1, label="full")
            continue
        ax.scatter(r["metrics"]["compression_ratio"], r["metrics"]["ppl"])
        ax.annotate(label(r).split(" (")[0].replace(", per-layer basis", " per-layer"),
                    (r["metrics"]["compression_ratio"], r["metrics"]["ppl"]), fontsize=7)
    ax.set_xlabel("compression ratio (fp16 reference / bytes held)")
    ax.set_ylabel("perplexity (WikiText-2, first 1024-token window)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    # the full cache, same window, chunk and text: measured once, in the quant folder, shared by both tables
    full = next(r for r in rows(DIRS["quant"]) if r["cache"] == "full")
    for path in DIRS.values():
        if not (path / "records.jsonl").exists():
            print(f"no records in {path}", file=sys.stderr)
            continue
        recs = rows(path)
        recs = recs if any(r["cache"] == "full" for r in recs) else [full, *recs]
        head = (path / "HEADER.md").read_text() if (path / "HEADER.md").exists() else ""
        body = table(recs, full["metrics"]["ppl"])
        (path / "README.md").write_text(f"{head}\n## Perplexity\n\n{body}\n\n![ppl vs ratio](ppl_ratio.png)\n")
        plot(recs, path / "ppl_ratio.png")
        print(f"wrote {path / 'README.md'}")


if __name__ == "__main__":
    main()
