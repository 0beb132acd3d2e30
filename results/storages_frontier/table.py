"""results/storages_frontier/README.md (table, best row per bit budget) and pareto.png from rows.jsonl
(written by run.sh / measure.py).

    .venv/bin/python results/storages_frontier/table.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXTS = ("wikitext2", "paradise_lost")
CEILINGS = (8.5, 5.1, 4.75, 4.1, 3.75, 3.1)  # measured bits per entry: ~8, ~4 and ~2 bits plus scales


def load() -> dict[str, dict[str, dict]]:
    rows: dict[str, dict[str, dict]] = {}
    for line in (HERE / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["row"], {})[r["dataset"]] = r  # the latest record of a row and text
    return {name: r for name, r in rows.items() if set(TEXTS) <= set(r)}  # rows measured on every text


def delta(r: dict, full: dict) -> float:
    return 100 * (r["ppl"] / full[r["dataset"]]["ppl"] - 1)


def ci(r: dict) -> str:
    lo, hi = r["ppl_ci"]
    return "" if lo != lo else f" [{lo:.2f}, {hi:.2f}]"  # NaN: a single window has no interval


def table(rows: dict[str, dict[str, dict]]) -> tuple[str, str]:
    full = rows["full (fp32)"]
    head = ["| storage | budget (bits) | bits / entry (measured) | calib KB | "
            + " | ".join(f"{t} ppl [95% CI] | Δppl" for t in TEXTS) + " |",
            "|---|---|---|---|" + "---|---|" * len(TEXTS)]
    order = sorted(rows, key=lambda n: (-rows[n][TEXTS[0]]["target_bits"], rows[n][TEXTS[0]]["bits_per_entry"]))
    for name in order:
        r = rows[name]
        cells = [f"{r[t]['ppl']:.3f}{ci(r[t])} | {delta(r[t], full):+.2f}%" for t in TEXTS]
        head.append(f"| {name} | {r[TEXTS[0]]['target_bits']} | {r[TEXTS[0]]['bits_per_entry']:.2f} | "
                    f"{r[TEXTS[0]]['calibration_bytes'] / 1e3:.1f} | " + " | ".join(cells) + " |")
    mean = {n: sum(delta(rows[n][t], full) for t in TEXTS) / len(TEXTS) for n in rows}
    bits = {n: rows[n][TEXTS[0]]["bits_per_entry"] for n in rows}
    best = []
    for ceiling in CEILINGS:  # the best row whose measured bytes fit the budget (short windows inflate residuals)
        fits = sorted((n for n in rows if bits[n] <= ceiling), key=mean.get)
        if fits:
            nxt = f"; next {fits[1]} ({mean[fits[1]]:+.2f}%)" if len(fits) > 1 else ""
            best.append(f"- <= {ceiling} bits / entry: **{fits[0]}** ({bits[fits[0]]:.2f} bits, mean Δppl "
                        f"{mean[fits[0]]:+.2f}%){nxt}")
    front = [n for n in sorted(rows, key=bits.get) if not any(bits[m] <= bits[n] and mean[m] < mean[n] for m in rows)]
    best.append("- Pareto frontier (no row both smaller and better): " + ", ".join(
        f"{n} ({bits[n]:.2f} bits, {mean[n]:+.2f}%)" for n in front))
    return "\n".join(head), "\n".join(best)


def plot(rows: dict[str, dict[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = rows["full (fp32)"]
    fig, axes = plt.subplots(1, len(TEXTS), figsize=(13, 5))
    for ax, text in zip(axes, TEXTS, strict=True):
        for name, r in rows.items():
            if name == "full (fp32)":
                continue
            x, y = r[text]["bits_per_entry"], delta(r[text], full)
            ax.scatter(x, y, s=18)
            ax.annotate(name, (x, y), fontsize=6)
        ax.set(xlabel="bits per stored entry (kv_bytes, measured)", ylabel="Δppl vs full cache (%)", title=text,
               yscale="symlog")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "pareto.png", dpi=120)


def main() -> None:
    rows = load()
    t, best = table(rows)
    r = next(iter(rows["full (fp32)"].values()))
    sizes = ", ".join(f"{x['dataset']} {x['windows']} x {x['window']} tokens"
                      for x in rows["full (fp32)"].values())
    (HERE / "README.md").write_text(
        "# Storage frontier (issue 25): FP8, NVFP4 / MXFP4, rotation, product quantization vs int4, KIVI, KVQuant, "
        "GEAR\n\n"
        "SmolLM2-135M (fp32 compute), perplexity with the cache in the loop, no eviction; "
        f"{sizes}; chunk {r['chunk']}; calibration on {r['calibration_tokens']} TinyStories tokens. From "
        "`bash results/storages_frontier/run.sh && .venv/bin/python results/storages_frontier/table.py` "
        "(settings of each row in `measure.py`). Bits per entry: the cache's real `kv_bytes` (codes, scales, "
        "fp16 residual windows, int32 positions) per stored K/V entry at the window's end; calibration bytes "
        "(codebooks, scales, rotation matrix) apart. CPU-sized: short windows, intervals only where a text has "
        "several windows (bootstrap over windows).\n\n"
        f"{t}\n\nBest within each measured byte budget (mean Δppl over the two texts):\n\n{best}\n\n"
        "![Pareto](pareto.png)\n")
    plot(rows)
    print(t, best, sep="\n\n")


if __name__ == "__main__":
    main()
