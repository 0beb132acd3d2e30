"""Markdown tables of the eviction sweeps from results/eviction/records.jsonl (written by sweep.sh).

    .venv/bin/python results/eviction/table.py > results/eviction/README.md

Every figure comes from a record; the "relations" lines are computed from the same numbers. Records name the cache
by its axes (``policy`` + ``policy_params``; ``policy=none`` is the full cache); those of sections 1-4 were made
before the axes and given them by ``scripts/migrate_records.py``.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["full", "window", "streaming", "h2o", "snapkv", "pyramid", "tova", "knorm", "random"]
ATTENTION = ("h2o", "snapkv", "tova")


def load() -> list[dict]:
    """Ok records, the last one of each config (a re-run replaces an earlier one)."""
    latest: dict[str, dict] = {}
    for line in (HERE / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["status"] == "ok" and r["model"] == "smollm2-135m":
            latest[r["config_hash"]] = r
    return list(latest.values())


def policy(r: dict) -> str:
    """Policy name (``full`` for ``policy=none``); StreamingLLM without sinks is the plain recent window."""
    p, params = r["policy"], r["policy_params"]
    if p == "none":
        return "full"
    if p == "streaming" and params.get("sinks") == 0:
        return "window"
    slack = params.get("slack")
    return f"{p} (slack {slack})" if slack else p


def budget(r: dict):
    return None if r["policy"] == "none" else r["policy_params"].get("budget")


def fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def grid(records: list[dict], metric: str) -> tuple[dict, list]:
    cells: dict = {}
    for r in records:
        if budget(r) is not None and not r["metrics"].get("evictions"):
            raise SystemExit(f"{policy(r)} budget {budget(r)}: no eviction happened; the run measured nothing")
        cells[(policy(r), budget(r))] = r["metrics"][metric]
    budgets = sorted({b for (_, b) in cells if b is not None})
    return cells, budgets


def table(cells: dict, budgets: list, title: str, spec: str = ".2f") -> list[str]:
    rows = [f"| {title} | " + " | ".join(f"budget {b}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets)]
    for p in ORDER:
        if p == "full" and ("full", None) in cells:
            full = fmt(cells[("full", None)], spec)
            rows.append("| full (every token) | " + " | ".join(full for _ in budgets) + " |")
        elif any((p, b) in cells for b in budgets):
            name = {"window": "window (streaming, 0 sinks)", "streaming": "streaming (4 sinks)"}.get(p, p)
            rows.append(f"| {name} | " + " | ".join(fmt(cells.get((p, b)), spec) for b in budgets) + " |")
    return rows


def wins(cells: dict, budgets: list, a: str, b: str, lower_better: bool = True) -> tuple[int, int]:
    """(budgets where a beats b, budgets where both exist)."""
    pairs = [(cells[(a, x)], cells[(b, x)]) for x in budgets if (a, x) in cells and (b, x) in cells]
    return sum((u < v) if lower_better else (u > v) for u, v in pairs), len(pairs)


def verdict(w: int, n: int) -> str:
    return "holds" if w == n else "does not hold" if w == 0 else "mixed"


def relations(cells: dict, budgets: list, lower_better: bool, what: str) -> list[str]:
    pairs = [("streaming", "window", "sinks (streaming) beat a plain window")]
    pairs += [(p, "random", f"{p} beats random") for p in (*ATTENTION, "knorm")]
    pairs += [("snapkv", "h2o", "SnapKV beats H2O")]
    out = []
    for a, b, claim in pairs:
        w, n = wins(cells, budgets, a, b, lower_better)
        if n:
            out.append(f"- {what}: {claim} at {w} of {n} budgets ({verdict(w, n)}).")
    return out


def speed_rows(records: list[dict]) -> list[str]:
    """Decode tokens/s relative to full in the same round (seed), averaged over rounds."""
    by_seed: dict = defaultdict(dict)
    for r in records:
        by_seed[r["seed"]][policy(r)] = r["metrics"]["decode_tokens_per_s"]
    ratios: dict = defaultdict(list)
    speeds: dict = defaultdict(list)
    for caches in by_seed.values():
        for p, tps in caches.items():
            speeds[p].append(tps)
            if "full" in caches:
                ratios[p].append(tps / caches["full"])
    rows = ["| cache | decode tokens/s (mean of rounds) | relative to full (same round) | rounds |",
            "|---|---|---|---|"]
    for p in sorted(speeds, key=lambda p: (ORDER.index(p.split()[0]), p)):
        if p in speeds:
            rel = statistics.mean(ratios[p]) if ratios[p] else None
            rows.append(f"| {p} | {statistics.mean(speeds[p]):.1f} | {fmt(rel)} | {len(speeds[p])} |")
    return rows


def main() -> None:
    sys.path.insert(0, str(HERE))
    from policies import section, selected

    recs = load()
    five = selected(recs)  # section 5 (every policy, 2,048-token prefill); sections 1-4 are the other runs
    by_eval = defaultdict(list)
    for r in recs:
        if not any(r is s for s in five):
            by_eval[r["eval"]].append(r)
    out = ["# Token eviction on SmolLM2-135M (CPU)", "",
           "Generated by `.venv/bin/python results/eviction/table.py > results/eviction/README.md` from",
           "`records.jsonl`, which `results/eviction/sweep.sh` writes (presets `conf/experiment/eviction_*.yaml`).",
           "fp32 on a shared, oversubscribed 2-core CPU, one thread per run; sizes were cut to fit ~40 min of CPU",
           "(one 4k window, one prefill_decode sample, one key per passkey depth): single-document numbers, noisy.",
           "Budgets are tokens kept per layer and row; every policy keeps original positions (no re-rotation).",
           "`summary.md`, `summary.csv`, `ratio_vs_dppl.png` and `speed_vs_dppl.png` are the generic sweep report",
           "of the same records (the latest record of each config; the sweeps' end-of-multirun report writes them,",
           "rebuilt by `kvc-report results/eviction --command \"bash results/eviction/sweep.sh\"`).",
           "The records of sections 1-4 were made before the three axes (old names, `cache=h2o`, ...) and given their",
           "axis fields by `python scripts/migrate_records.py results/eviction/records.jsonl` (numbers unchanged; each",
           "has a `migrated` field and keeps its old `cache` / `cache_params` under `pre_axes`); section 5's were",
           "written with them. The tables read `policy` / `policy_params` (`policy=none` is the full cache).", ""]
    rel: list[str] = []
    if by_eval["ppl"]:
        cells, budgets = grid(by_eval["ppl"], "ppl")
        ev = by_eval["ppl"][0]["eval_params"]
        out += [f"## 1. Perplexity, one {ev['window']}-token window of {ev['dataset']}, "
                f"{ev['chunk']} tokens per step, when=decode", "",
                "`kvc -m experiment=eviction_ppl` (+ `policy=streaming policy.sinks=0`, + `policy=none`). The cache",
                "evicts after every step, so it holds at most budget + chunk tokens while the window runs to 4096.", ""]
        out += table(cells, budgets, "ppl (lower is better)") + [""]
        rel += relations(cells, budgets, True, "ppl")
    if by_eval["prefill_decode"]:
        cells, budgets = grid(by_eval["prefill_decode"], "ppl")
        ev = by_eval["prefill_decode"][0]["eval_params"]
        out += [f"## 2. Prefill {ev['context']} tokens of {ev['dataset']}, compress once (when=prefill), "
                f"score the next {ev['continuation']} one by one", "",
                "`kvc -m experiment=eviction_prefill_decode` (+ window, + full).", ""]
        out += table(cells, budgets, "ppl of the continuation") + [""]
        rel += relations(cells, budgets, True, "prefill_decode")
    if by_eval["passkey"]:
        pk = by_eval["passkey"]
        ev = pk[0]["eval_params"]
        depths = [round(100 * d) for d in ev["depths"]]
        out += [f"## 3. Passkey accuracy by depth, {ev['lengths']} tokens, {ev['trials']} key(s) per depth, "
                "prompt compressed once at prefill end (when=prefill)", "",
                "`kvc -m experiment=eviction_passkey` (+ `policy=none`, the ceiling). With one key per depth each cell",
                "is a single 0/1 trial. SnapKV scores with the last 32 prompt queries, i.e. the question itself.", "",
                "| cache | budget | " + " | ".join(f"depth {d}%" for d in depths) + " | mean |",
                "|---|---|" + "---|" * (len(depths) + 1)]
        key = lambda r: (ORDER.index(policy(r)), budget(r) or 0)
        for r in sorted(pk, key=key):
            m = r["metrics"]
            out.append(f"| {policy(r)} | {budget(r) or 'all'} | "
                       + " | ".join(fmt(m.get(f"acc_depth{d}"), ".1f") for d in depths) + f" | {m['accuracy']:.2f} |")
        out.append("")
        cells, budgets = grid(pk, "accuracy")
        rel += relations(cells, budgets, False, "passkey (mean accuracy; ties count as no win)")
    if by_eval["speed"]:
        ev = by_eval["speed"][0]["eval_params"]
        b = {budget(r) for r in by_eval["speed"] if budget(r)}
        out += [f"## 4. Decode speed: context {ev['context']}, {ev['decode_tokens']} decode steps, batch "
                f"{ev['batch_size']}, budget {', '.join(map(str, sorted(b)))}, when=decode", "",
                "`kvc -m experiment=eviction_speed`. Each decode step evicts one token per layer; the policies",
                "that score by attention get the softmax weights from the same attention pass. `slack 64` rows:",
                "`kvc -m experiment=eviction_speed policy=<streaming or h2o> policy.slack=64` (evict 64 at a time).",
                "Shared, oversubscribed CPU: absolute tokens/s are tiny and noisy; compare ratios.", ""]
        out += speed_rows(by_eval["speed"]) + [""]
    if rel:
        out += ["## Known relations on this model (computed from the tables above)", "", *rel, ""]
    out += section(five)
    print("\n".join(out))


if __name__ == "__main__":
    main()
