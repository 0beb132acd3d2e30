"""results/storages_frontier/README.md (per model: table, best row per bit budget, Pareto frontier; the RULER needle
table; the decode cost per step) and pareto.png, from rows.jsonl (run.sh / measure.py), ruler/records.jsonl
(ruler.sh) and decode_cost.jsonl (decode_cost.py).

    .venv/bin/python results/storages_frontier/table.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXTS = ("wikitext2", "paradise_lost")
FULL = "full (fp32)"
CEILINGS = (8.5, 5.1, 4.75, 4.35, 4.1, 3.75, 3.35, 3.1, 2.3)  # measured bits per entry: ~8, ~4, ~3, ~2 bits + scales
RULER_ROWS = {  # kvc's storage settings -> measure.py's row name (the same settings)
    ("dense", ()): FULL, ("fp8", ()): "fp8 e4m3 per-token", ("fp4", ("nvfp4",)): "NVFP4",
    ("fp4", ("mxfp4",)): "MXFP4", ("rotated", (4, 4)): "Hadamard + int4 g32",
    ("rotated", (4, 2)): "Hadamard + int4 K / int2 V g32", ("rotated", (2, 2)): "Hadamard + int2 g32",
    ("int4", (32,)): "int4 g32", ("kivi", (4, 32)): "KIVI-4 g32 r32", ("kivi", (2, 32)): "KIVI-2 g32 r32",
    ("kvquant", (4,)): "KVQuant-4 1%", ("kvquant", (3,)): "KVQuant-3 1%", ("kvtc", (4.0,)): "KVTC 4-bit",
    ("kvtc", (3.0,)): "KVTC 3-bit", ("kvtc", (2.0,)): "KVTC 2-bit"}
RULER_KEYS = {"fp4": ("format",), "rotated": ("key_bits", "value_bits"), "int4": ("group_size",),
              "kivi": ("bits", "residual"), "kvquant": ("bits",), "kvtc": ("bits",)}


def load() -> dict[str, dict[str, dict[str, dict]]]:
    """model -> row -> text -> the latest record (rows measured on every text only)."""
    rows: dict[str, dict[str, dict[str, dict]]] = {}
    for line in (HERE / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        model = r.get("model", "smollm2-135m")  # records before MODEL existed are SmolLM2's
        rows.setdefault(model, {}).setdefault(r["row"], {})[r["dataset"]] = r
    return {m: {n: r for n, r in rs.items() if set(TEXTS) <= set(r)} for m, rs in rows.items()}


def delta(r: dict, full: dict) -> float:
    return 100 * (r["ppl"] / full[r["dataset"]]["ppl"] - 1)


def ci(r: dict) -> str:
    lo, hi = r["ppl_ci"]
    return "" if lo != lo else f" [{lo:.2f}, {hi:.2f}]"  # NaN: a single window has no interval


def table(rows: dict[str, dict[str, dict]]) -> tuple[str, str, dict[str, float]]:
    full = rows[FULL]
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
    return "\n".join(head), "\n".join(best), mean


def section(model: str, rows: dict[str, dict[str, dict]]) -> str:
    t, best, _ = table(rows)
    r = next(iter(rows[FULL].values()))
    sizes = ", ".join(f"{x['dataset']} {x['windows']} x {x['window']} tokens" for x in rows[FULL].values())
    return (f"## {model}\n\n{len(rows)} rows; {sizes}; chunk {r['chunk']}; calibration on {r['calibration_tokens']} "
            f"TinyStories tokens.\n\n{t}\n\nBest within each measured byte budget (mean Δppl over the two texts):"
            f"\n\n{best}\n")


def ruler() -> str:
    path = HERE / "ruler" / "records.jsonl"
    if not path.exists():
        return ""
    runs = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("status") != "ok":
            continue
        p = r.get("storage_params", {})
        key = (r["storage"], tuple(p.get(k) for k in RULER_KEYS.get(r["storage"], ())))
        runs[RULER_ROWS.get(key, f"{r['storage']} {p}")] = r["metrics"]  # the latest run of each setting
    if not runs:
        return ""
    lines = ["| storage | bits / entry | accuracy [95% CI] | niah_single_1 | niah_single_2 |", "|---|---|---|---|---|"]
    for name, m in sorted(runs.items(), key=lambda kv: -kv[1]["kv_bytes"]):
        acc = f"{m['accuracy']:.2f} [{m['accuracy/ci_low']:.2f}, {m['accuracy/ci_high']:.2f}]"  # one protocol
        tasks = " | ".join(f"{m.get(f'{t}/all/acc', float('nan')):.2f}"
                           for t in ("niah_single_1", "niah_single_2"))
        lines.append(f"| {name} | {16 / m['compression_ratio']:.2f} | {acc} | {tasks} |")
    return ("## RULER needles (SmolLM2-135M-Instruct)\n\nFrom `bash results/storages_frontier/ruler.sh` (eval=ruler: "
            "niah_single_1 and niah_single_2 at 1024 tokens, 4 samples each, query-aware, chat template; settings "
            "as measure.py's rows). Bits / entry: 16 / the record's compression ratio (fp16 reference bytes over "
            "bytes held, prompt and answer). 8 samples per storage: intervals are wide.\n\n" + "\n".join(lines)
            + "\n")


def decode_cost() -> str:
    path = HERE / "decode_cost.jsonl"
    if not path.exists():
        return ""
    recs = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        recs[r["row"]] = r
    r0 = next(iter(recs.values()))
    lines = ["| storage | decode step (ms) | reading the cache (ms) |", "|---|---|---|"]
    lines += [f"| {n} | {r['step_ms']:.1f} | {r['read_ms']:.1f} |" for n, r in recs.items()]
    return (f"## Decode cost per step\n\nFrom `OMP_NUM_THREADS=1 .venv/bin/python "
            f"results/storages_frontier/decode_cost.py`: SmolLM2-135M, one row of {r0['context']} tokens, best of "
            f"{r0['repeats']} single-token steps on this shared CPU (one thread; loaded by other jobs, so only the "
            "ratios mean something); reading = every layer's `read` (KVTC: inflating and decoding every cold "
            "block).\n\n" + "\n".join(lines) + "\n")


def plot(models: dict[str, dict[str, dict[str, dict]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), len(TEXTS), figsize=(13, 5 * len(models)), squeeze=False)
    for row, (model, rows) in zip(axes, models.items(), strict=True):
        full = rows[FULL]
        for ax, text in zip(row, TEXTS, strict=True):
            for name, r in rows.items():
                if name == FULL:
                    continue
                x, y = r[text]["bits_per_entry"], delta(r[text], full)
                ax.scatter(x, y, s=18, marker="*" if name.startswith("KVTC") else "o")
                ax.annotate(name, (x, y), fontsize=6)
            ax.set(xlabel="bits per stored entry (kv_bytes, measured)", ylabel="Δppl vs full cache (%)",
                   title=f"{model}: {text}", yscale="symlog")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "pareto.png", dpi=110)


def main() -> None:
    models = load()
    body = "\n".join(section(m, rows) for m, rows in models.items())
    (HERE / "README.md").write_text(
        "# Storage frontier (issue 25): FP8, NVFP4 / MXFP4, rotation, product quantization, KVTC vs int4, KIVI, "
        "KVQuant, GEAR\n\n"
        "Perplexity with the cache in the loop (fp32 compute), no eviction. From "
        "`bash results/storages_frontier/run.sh smollm2-135m && bash results/storages_frontier/run.sh qwen2.5-0.5b "
        "&& .venv/bin/python results/storages_frontier/table.py` (settings of each row in `measure.py`; the "
        "qwen2.5-0.5b rows are a subset). Bits per entry: the cache's real `kv_bytes` (codes, scales, KVTC's "
        "DEFLATE streams, fp16 residual windows, int32 positions) per stored K/V entry at the window's end; "
        "calibration bytes (codebooks, scales, rotation matrix, PCA bases) apart. CPU-sized: short windows, "
        "intervals only where a text has several windows (bootstrap over windows).\n\n"
        f"{body}\n{ruler()}\n{decode_cost()}\n![Pareto](pareto.png)\n")
    plot(models)
    print(body)


if __name__ == "__main__":
    main()
