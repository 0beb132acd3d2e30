"""results/sharing/records.jsonl -> results/sharing/README.md (perplexity and speed tables, layer similarity).

    .venv/bin/python scripts/sharing_table.py [results/sharing]

The groups of ``groups=auto`` rows are recomputed from the saved layer-similarity calibration (the newest
``similarity-*.pt`` in $KVC_CALIBRATION_DIR or ~/.cache/kvcompress/calibration), exactly as the cache picks them.

Records name the cache by its axes: ``layout`` (``cla``, ``minicache``; ``per_layer`` for the full cache) with
``layout_params``, and ``storage`` under it; ``cache`` is the short name (``int8+cla``, ``full``). The records here
were made before the axes and given them by ``scripts/migrate_records.py``.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

from sharing_heatmap import newest_saved

from kvcompress.cache.layout.groups import auto_groups, describe, uniform_groups
from kvcompress.cache.layout.similarity import LayerSimilarity
from kvcompress.engine.config import ModelConfig
from kvcompress.engine.loaders import read_config, resolve_source
from kvcompress.report.table import latest, load

MODEL = "smollm2-135m"


def consumers(c: ModelConfig, group_size: int) -> int:
    return sum(len(g) - 1 for g in uniform_groups(c.num_layers, group_size))


def kv_projection_share(c: ModelConfig, group_size: int) -> float:
    """Fraction of the per-token matmul multiply-adds that uniform groups of ``group_size`` skip (consumers' k/v)."""
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * c.intermediate_size
    return consumers(c, group_size) * h * 2 * kv / (c.num_layers * per_layer + h * c.vocab_size)

HEADER = """# Cross-layer KV sharing on SmolLM2-135M

All figures come from `bash scripts/sharing_sweep.sh` (runs `kvc -m experiment=sharing_sweep ...` and
`kvc -m experiment=sharing_speed ...`, then this table: `python scripts/sharing_table.py`; the heatmap and the pair
table from `python scripts/sharing_heatmap.py`; `summary.md` and the ratio / speed plots from `kvc-report`).
Records: `records.jsonl`. Device: {devices}.
Perplexity: WikiText-2, cache in the loop (chunk 16: every token attends to the shared / merged history), 4 windows
of 1024 tokens (4,092 scored tokens; the same text as results/lowrank), fp32 model. `groups=auto` calibrates on
4,096 TinyStories tokens (disjoint from the evaluation text). `ratio` is the fp16 reference over the bytes held
(the fp32 full cache is 0.50x: 4-byte K/V plus int32 positions); `vs full` is the full cache's bytes over the bytes
held, in the same dtype, i.e. the memory saved by sharing itself.
The records were made before the three axes (old names, `cache=cla cache.storage=int8`, ...) and given their axis
fields by `python scripts/migrate_records.py results/sharing/records.jsonl` (numbers unchanged; each record has a
`migrated` field and keeps its old `cache` / `cache_params` under `pre_axes`); the tables read `layout` /
`layout_params` and `storage`, and are rebuilt by `python scripts/sharing_table.py`.
"""

NOTES = """Reading the tables:
- No training: CLA is normally trained in (Brandon et al. 2024). Applied post hoc, a consumer layer attends with its
  own queries to keys its own projections never produced. On this model adjacent layers' keys and values are close
  to orthogonal per KV head (mean cosine near 0: heatmap and pair table below), so every shared layer costs
  perplexity. Layer 1 reading layer 0 alone costs 3.5 nats (pair table), which is why every uniform grouping that
  starts at layer 0 is unusable; the rows `from layer N` share the deep layers only.
- At equal memory (the 6-consumer rows, `vs full` 1.25x), `auto` ranked by the measured NLL cost beats uniform
  pairs and triples over the last layers, and beats `auto` ranked by cosine: cosine similarity does not predict
  the cost on this model. `auto` ranks adjacent pairs by their cost each alone; chained consumers (groups longer
  than 2) read a producer further away than the pair that was measured, so the ranking is optimistic for them.
- Composition: int8 storage under CLA or MiniCache changes perplexity by less than 0.01 here while cutting the
  bytes a further ~3.7x (compare each int8 row with its dense twin).
- MiniCache: per token and KV head, keys and values are split into direction and magnitude; a pair stores the
  SLERP-merged direction (t = 0.5), each layer's magnitude (fp16) and, unmerged, every token whose directions are
  `threshold` radians apart or more in any head, keys or values. With near-orthogonal layers, merging anything
  costs a lot and the retention angle decides almost everything. The saving is bounded by the merged pairs'
  share of the layers (from layer 15: 7 pairs of 30 layers, so at most 23%), and when few tokens merge the cache
  can hold *more* than the full cache: rows of a batch merge different tokens, and each step's merged and
  retained tokens are padded to the longest row (the threshold 1.60 and 1.70 rows).
"""

SPEED_NOTES = """1,024-token WikiText-2 context prefilled in one forward, then 32 teacher-forced decode steps, batch 1,
fp32. Each run is the median of 3 timed passes (`eval.repeats`); 2 runs per setting (the seed does not change the
work); the two runs of a skipped / computed pair were adjacent, and the full cache ran first and last. Consumers
never append; with projections `computed` the engine computes and discards their k/v (same logits,
tests/test_sharing.py), which isolates what the skip saves: {g2:.1%} (group size 2, {n2} consumers) or {g3:.1%}
(group size 3, {n3} consumers) of the per-token matmul multiply-adds, attention excluded (from the model's
dimensions). Decode shows a gain of that size; prefill differs by more than that between two runs of the same
setting on this CPU, so its small differences are noise. MiniCache decodes slower: each step of a merged layer
concatenates its retained, reconstructed-merged and new tokens, and merges the step's tokens after attending.
"""


def table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return out + ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]


def groups_of(p: dict, sim: LayerSimilarity | None, layers: int) -> str:
    if p.get("groups") == "auto":
        if sim is None:
            return "auto (no calibration file)"
        diag = (sim.key_cos.diagonal(1) + sim.value_cos.diagonal(1)) / 2
        cost = sim.pair_dnll.tolist() if p.get("auto_metric", "ppl") == "ppl" else (1 - diag).tolist()
        return describe(auto_groups(cost, layers, p["share_fraction"]))
    if isinstance(p.get("groups"), list):
        return describe(p["groups"])
    return describe([g for g in uniform_groups(layers, p["group_size"], p.get("start_layer", 0)) if len(g) > 1])


def label(r: dict, sim: LayerSimilarity | None, layers: int) -> dict:
    p, m, storage = r["layout_params"], r["metrics"], r["storage"]
    if r["cache"] == "full":
        return {"cache": "full", "setting": "", "storage": "dense", "layers shared / merged": ""}
    if r["layout"] == "cla":
        start = f" from layer {p['start_layer']}" if p.get("start_layer") else ""
        how = (f"auto {p['share_fraction']} ({p.get('auto_metric', 'ppl')})" if p.get("groups") == "auto"
               else f"group size {p['group_size']}{start}")
        groups = m.get("layer_groups") or groups_of(p, sim, layers)  # newer records name their groups
        return {"cache": "CLA", "setting": how, "storage": storage, "groups": groups,
                "layers shared / merged": f"{int(m['shared_layers'])} shared"}
    return {"cache": "MiniCache", "setting": f"from layer {p['start_layer']}, threshold {p['threshold']:.2f}",
            "storage": storage, "layers shared / merged": f"{m['merged_fraction']:.0%} of pair tokens merged"}


def ppl_table(records: list[dict], sim: LayerSimilarity | None, layers: int) -> list[str]:
    ppl = [r for r in records if r["eval"] == "ppl" and r["status"] == "ok"]
    base = [r for r in ppl if r["cache"] == "full"]
    if not base:
        return ["(no full-cache baseline yet)"]
    ref, ref_bytes = base[-1]["metrics"]["ppl"], base[-1]["metrics"]["kv_bytes"]
    rows = []
    for r in ppl:
        m = r["metrics"]
        rows.append({**label(r, sim, layers), "ppl": f"{m['ppl']:.3f}", "Δppl": f"{m['ppl'] - ref:+.3f}",
                     "ratio": f"{m['compression_ratio']:.2f}x", "vs full": f"{ref_bytes / m['kv_bytes']:.2f}x",
                     "KV MB": f"{m['kv_bytes'] / 1e6:.1f}"})
    order = {"full": 0, "CLA": 1, "MiniCache": 2}
    rows.sort(key=lambda row: (order[row["cache"]], row["storage"] != "dense", row["setting"]))
    return table(rows, ["cache", "setting", "storage", "groups", "layers shared / merged", "ppl", "Δppl", "ratio",
                        "vs full", "KV MB"])


def speed_table(records: list[dict]) -> list[str]:
    speed = [r for r in records if r["eval"] == "speed" and r["status"] == "ok"]
    runs: dict[tuple, list[dict]] = {}
    for r in speed:
        p = r["layout_params"]
        key = (("full", "", "") if r["cache"] == "full" else
               ("CLA", f"group size {p['group_size']}", "skipped" if p["skip_projections"] else "computed")
               if r["layout"] == "cla" else ("MiniCache", f"from layer {p['start_layer']}", ""))
        runs.setdefault(key, []).append(r)
    full = runs.get(("full", "", ""))
    mean = lambda rs, k: statistics.mean(r["metrics"][k] for r in rs)
    rows = []
    for (cache, setting, proj), rs in runs.items():
        row = {"cache": cache, "setting": setting, "consumer k/v projections": proj, "runs": len(rs)}
        for k, name in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")):
            row[f"{name} tok/s (each run)"] = ", ".join(f"{r['metrics'][k]:.1f}" for r in rs)
            row[f"{name} vs full"] = f"{mean(rs, k) / mean(full, k):.2f}x" if full else ""
        rows.append(row)
    return table(rows, ["cache", "setting", "consumer k/v projections", "runs", "prefill tok/s (each run)",
                        "prefill vs full", "decode tok/s (each run)", "decode vs full"])


def devices(records: list[dict]) -> str:
    return ", ".join(sorted({str(r.get("device")) for r in records})) or "?"


def main(folder: str = "results/sharing") -> None:
    path = Path(folder)
    records = latest(load(path / "records.jsonl"))
    sim = similarity_of(records)
    config = read_config(resolve_source(MODEL), MODEL)
    speed_notes = SPEED_NOTES.format(g2=kv_projection_share(config, 2), n2=consumers(config, 2),
                                     g3=kv_projection_share(config, 3), n3=consumers(config, 3))
    lines = [HEADER.format(devices=devices(records)), "## Perplexity", "", *ppl_table(records, sim, config.num_layers),
             "", NOTES, "## Speed: skipping the consumers' k/v projections", "", speed_notes, "",
             *speed_table(records), "",
             "## Layer similarity (calibration)", "", "![layer similarity](similarity.png)", ""]
    if (path / "similarity.md").exists():
        lines += [(path / "similarity.md").read_text()]
    (path / "README.md").write_text("\n".join(lines))


def similarity_of(records: list[dict]) -> LayerSimilarity | None:
    """The calibration the ``groups=auto`` rows used: named by their records (``calibration_file``), else (older
    records) the newest saved one made for this model; None when there is none here."""
    named = [r["metrics"]["calibration_file"] for r in records if r["metrics"].get("calibration_file")]
    path = Path(named[-1]) if named and Path(named[-1]).is_file() else newest_saved(MODEL)
    return LayerSimilarity.load(path) if path else None


if __name__ == "__main__":
    main(*sys.argv[1:])
