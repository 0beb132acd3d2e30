"""results/lowrank/records.jsonl -> results/lowrank/README.md (perplexity and decode-speed tables).

    .venv/bin/python scripts/lowrank_table.py [results/lowrank]

Records name the cache by its axes: the latent settings are ``storage_params`` of ``storage=latent``; ``cache`` is
the short name (``latent``, or ``full`` for the baseline). The records here were made before the axes and given
them by ``scripts/migrate_records.py``.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from kvcompress.report.table import latest, load

HEADER = """# Latent low-rank KV cache (MLA-style) on SmolLM2-135M

All figures come from `bash scripts/lowrank_sweep.sh` (the runs: `kvc -m experiment=lowrank_sweep` plus
variant overrides, `kvc -m experiment=lowrank_speed`), here run on an NVIDIA H100 with `device=cuda` by
`scripts/lowrank_gpu.sh` (the shared 2-core CPU was too loaded; two of the runs repeated there gave the same
perplexities: full 23.092, K+V 0.75 29.533). Records: `records.jsonl`; this file from
`python scripts/lowrank_table.py`; the plot and last table from `scripts/lowrank_energy.py`; the attention
micro-benchmarks from `scripts/lowrank_bench_attend.py`.
Perplexity: WikiText-2, cache in the loop (chunk 16), 4 windows of 1024 tokens (4,092 scored tokens), fp32
model. Calibration: 4,096 TinyStories tokens (disjoint from the evaluation text). Latents and rope dims are
stored in fp16; ratio = fp16 full KV / bytes held (latents + uncompressed rope dims + int32 positions). The
projections (`calib MB`, fp32) are a one-off cost, not in the ratio. `rank` is the mean rank per layer of the
key / value (or joint) latent, whose input is the layer's 3 KV heads joined (keys 3 x (64 - rope dims),
values 3 x 64) unless `per head`.
The records were made before the three axes (old names, `cache=lowrank`, ...) and given their axis fields by
`python scripts/migrate_records.py results/lowrank/records.jsonl` (numbers unchanged; each record has a `migrated`
field and keeps its old `cache` / `cache_params` under `pre_axes`); the tables read `storage_params` of
`storage=latent` and are rebuilt by `python scripts/lowrank_table.py`.
"""


def label(p: dict) -> dict:
    rank = f"auto e={p['energy']}" if p.get("rank") == "auto" else (p.get("rank") or p.get("rank_fraction"))
    rope = str(p.get("rope_dims", 0)) + (" nope" if p.get("nope") else "")
    return {"latent": "joint KV" if p.get("joint_kv") else "K + V", "rank spec": rank,
            "keys": p.get("keys", "pre_rope").replace("_rope", "-RoPE"), "rope dims": rope,
            "per head": "yes" if p.get("per_head") else "", "latent bits": p.get("latent_bits") or 16}


def fmt_rank(m: dict) -> str:
    if "joint_rank_mean" in m:
        return f"{m['joint_rank_mean']:.0f}"
    return f"{m.get('key_rank_mean', 0):.0f} / {m.get('value_rank_mean', 0):.0f}"


def table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return out


def ppl_table(records: list[dict]) -> list[str]:
    ppl = [r for r in records if r["eval"] == "ppl" and r["status"] == "ok"]
    base = [r for r in ppl if r["cache"] == "full"]
    if not base:
        return ["(no full-cache baseline yet)"]
    ref = base[-1]["metrics"]["ppl"]
    rows = []
    for r in ppl:
        m, p = r["metrics"], r["storage_params"]
        if r["cache"] == "full":
            row = {"latent": "full cache", "rank spec": "", "keys": "", "rope dims": "", "per head": "",
                   "latent bits": 16, "rank": ""}
        else:
            row = {**label(p), "rank": fmt_rank(m)}
        row.update(device=r.get("device"), ppl=f"{m['ppl']:.3f}", **{"Δppl": f"{m['ppl'] - ref:+.3f}",
                   "ratio": f"{m['compression_ratio']:.2f}x", "calib MB": f"{m.get('calibration_bytes', 0) / 1e6:.2f}"})
        rows.append(row)
    order = lambda row: (row["latent"] != "full cache", row["keys"] != "pre-RoPE", row["rope dims"] != "0",
                         row["per head"], row["latent"], row["latent bits"] != 16, -float(row["ratio"][:-1]))
    rows.sort(key=order)
    cols = ["latent", "keys", "rope dims", "per head", "latent bits", "rank spec", "rank", "ppl", "Δppl", "ratio",
            "calib MB", "device"]
    return table(rows, cols)


def speed_table(records: list[dict]) -> list[str]:
    speed = [r for r in records if r["eval"] == "speed" and r["status"] == "ok"]
    groups: dict[tuple, list[dict]] = {}
    for r in speed:
        p = r["storage_params"]
        key = ("full cache", "", "") if r["cache"] == "full" else (
            label(p)["latent"] + f", rope dims {label(p)['rope dims']}", "absorbed" if p["absorb"] else "reconstructed",
            fmt_rank(r["metrics"]))
        groups.setdefault(key, []).append(r)
    full = statistics.mean(r["metrics"]["decode_tokens_per_s"] for r in groups.get(("full cache", "", ""), [])) \
        if ("full cache", "", "") in groups else None
    rows = []
    for (variant, attn, rank), rs in groups.items():
        tps = [r["metrics"]["decode_tokens_per_s"] for r in rs]
        rows.append({"cache": variant, "attention": attn, "rank": rank, "runs": len(rs),
                     "decode tok/s (each run)": ", ".join(f"{t:.1f}" for t in tps),
                     "vs full": f"{statistics.mean(tps) / full:.2f}x" if full else "",
                     "ppl (64 tok)": f"{statistics.mean(r['metrics']['ppl'] for r in rs):.3f}",
                     "ratio": f"{rs[0]['metrics']['compression_ratio']:.2f}x"})
    return table(rows, ["cache", "attention", "rank", "runs", "decode tok/s (each run)", "vs full", "ppl (64 tok)",
                        "ratio"])


def devices(records: list[dict], kind: str) -> str:
    return ", ".join(sorted({str(r.get("device")) for r in records if r["eval"] == kind})) or "?"


def main(folder: str = "results/lowrank") -> None:
    path = Path(folder)
    records = latest(load(path / "records.jsonl"))
    lines = [HEADER, "## Perplexity", "", *ppl_table(records), "",
             "`nope`: the compressed key dims are not rotated (MHA2MLA partial RoPE without its fine-tuning: a change "
             "to the model, which is what lets keys be absorbed). `post-RoPE`: keys projected after rotation.", "",
             "## Decode speed, absorbed vs reconstructed attention", "",
             "2,048-token WikiText-2 context (prefill in chunks of 512), 64 teacher-forced decode steps, batch 1, "
             "rank fraction 0.5, fp32, device: " + devices(records, "speed") + " (one run each; the runs of a pair "
             "were adjacent).", "", *speed_table(records), "",
             "## Where the KV is compressible", "", "![explained variance vs rank](energy.png)", ""]
    benches = (("attend_bench_cuda.md", "Attention alone, GPU"), ("attend_bench_cpu.md", "Attention alone, CPU"))
    for name, title in benches:
        if (path / name).exists():
            lines += [f"### {title}", "", (path / name).read_text()]
    energy = path / "energy.md"
    if energy.exists():
        lines += ["## Explained variance per layer", "", energy.read_text()]
    lines += ["## Shared bases across layers (xKV-style)", "",
              "Issue 17, a CPU-sized protocol: [xkv/README.md](xkv/README.md).", ""]
    (path / "README.md").write_text("\n".join(lines))
    print(f"wrote {path / 'README.md'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
