"""Records -> one row per run: deduplicated, with Δppl against the full cache of the same model and eval."""
from __future__ import annotations

import csv
import functools
import io
import json
import math
from pathlib import Path

from kvcompress.records import read_records
from kvcompress.report.pareto import pareto_front

BASELINE = "full"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # settings are shown relative to conf/cache/*.yaml
# summary.md columns: (header, row key, format)
MD_COLUMNS = [("cache", "cache", "{}"), ("settings", "settings", "{}"), ("ppl", "ppl", "{:.3f}"),
              ("Δppl", "delta_ppl", "{:+.3f}"), ("Δppl %", "delta_ppl_pct", "{:+.2f}"),
              ("Δppl (ppl eval)", "quality_dppl", "{:+.3f}"),
              ("ratio", "compression_ratio", "{:.2f}x"), ("KV MB", "kv_mb", "{:.2f}"),
              ("decode tok/s", "decode_tokens_per_s", "{:.1f}"), ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
              ("Pareto", "pareto", "{}"), ("time s", "duration_s", "{:.1f}")]
FIRST_CSV = ["status", "model", "eval", "cache", "settings", "ppl", "delta_ppl", "delta_ppl_pct", "compression_ratio",
             "kv_bytes", "decode_tokens_per_s", "quality_dppl", "pareto", "baseline_ppl", "group", "error"]
LAST_CSV = ["cache_params", "eval_params", "dtype", "device", "seed", "config_hash", "git_sha", "started_at",
            "duration_s"]


def load(path: Path) -> list[dict]:
    """Records under ``path``: a JSONL file, every ``*.jsonl`` under a folder, else every ``record.json``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    records = read_records(path)
    if not records and path.is_dir():
        for f in sorted(path.rglob("record.json")):
            try:
                records.append(json.loads(f.read_text()))
            except json.JSONDecodeError:
                continue
    return records


def latest(records: list[dict]) -> list[dict]:
    """One record per config hash: the last ok one if any, else the last one (records are in write order)."""
    chosen: dict[str, dict] = {}
    for i, r in enumerate(records):
        key = r.get("config_hash") or f"#{i}"
        if key not in chosen or r.get("status") == "ok" or chosen[key].get("status") != "ok":
            chosen[key] = r
    return list(chosen.values())


def settings(params: dict | None, cache: str | None = None) -> str:
    """``budget=0.25 storage=int4`` (nested dicts flattened with dots).

    With ``cache`` (a ``conf/cache/<cache>.yaml`` name) only the settings that differ from that file.
    """
    def flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
        out = []
        for k, v in d.items():
            out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
        return out
    defaults = dict(flat(cache_defaults(cache))) if cache else {}
    return " ".join(f"{k}={v}" for k, v in flat(params or {}) if k not in defaults or defaults[k] != v)


@functools.cache
def cache_defaults(cache: str) -> dict:
    """The settings of ``conf/cache/<cache>.yaml`` ({} when there is no such file)."""
    path = CONF_DIR / "cache" / f"{cache}.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        conf = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # an unreadable preset only costs the short form
        return {}
    return {k: v for k, v in conf.items() if k != "_target_"} if isinstance(conf, dict) else {}


def group_key(r: dict) -> str:
    """Runs are comparable (share a baseline) when model, dtype, eval and its settings match."""
    ev = " ".join(f"{k}={v}" for k, v in sorted((r.get("eval_params") or {}).items()))
    return f"{r.get('model')} {r.get('dtype')} eval={r.get('eval')} {ev}".strip()


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def rows(records: list[dict]) -> list[dict]:
    """Flat rows (one per distinct config) with Δppl vs the group's full cache and the Pareto flag."""
    recs = latest(records)
    base: dict[str, float] = {}
    for r in recs:
        ppl = (r.get("metrics") or {}).get("ppl")
        if r.get("status") == "ok" and r.get("cache") == BASELINE and finite(ppl):
            base[group_key(r)] = ppl
    out = []
    for r in recs:
        m = r.get("metrics") or {}
        row = {"status": r.get("status"), "model": r.get("model"), "eval": r.get("eval"), "cache": r.get("cache"),
               "settings": settings(r.get("cache_params"), r.get("cache")), "group": group_key(r),
               "error": r.get("error"), **m}
        row.update({k: r.get(k) for k in LAST_CSV})
        row["cache_params"] = json.dumps(r.get("cache_params") or {}, sort_keys=True)
        row["eval_params"] = json.dumps(r.get("eval_params") or {}, sort_keys=True)
        b = base.get(row["group"])
        row["baseline_ppl"] = b
        if b is not None and finite(m.get("ppl")) and r.get("status") == "ok":
            row["delta_ppl"] = m["ppl"] - b
            row["delta_ppl_pct"] = 100 * (m["ppl"] - b) / b
        if finite(m.get("kv_bytes")):
            row["kv_mb"] = m["kv_bytes"] / 1e6
        out.append(row)
    for row in out:  # a speed run's quality: Δppl of the same settings under a quality eval (not its few tokens)
        if row["status"] == "ok" and finite(row.get("decode_tokens_per_s")):
            row["quality_dppl"] = quality_eval_delta(row, out)
    mark_pareto(out)
    return out


def quality_eval_delta(row: dict, table: list[dict]) -> float | None:
    """Δppl of the same model, dtype and cache settings in a group without decode speed (``eval=ppl`` first)."""
    same = [r for r in table if r is not row and r["status"] == "ok" and finite(r.get("delta_ppl"))
            and not finite(r.get("decode_tokens_per_s"))
            and (r["model"], r.get("dtype"), r["cache"], r["cache_params"])
            == (row["model"], row.get("dtype"), row["cache"], row["cache_params"])]
    same.sort(key=lambda r: (r["eval"] != "ppl", r["group"]))
    return same[0]["delta_ppl"] if same else None


def quality(row: dict) -> float | None:
    """Δppl of the quality eval of the same settings (speed runs), else Δppl when the group has a full-cache
    baseline, else ppl (same order within a group)."""
    v = row.get("quality_dppl")
    v = v if finite(v) else row.get("delta_ppl", row.get("ppl"))
    return v if finite(v) else None


def mark_pareto(table: list[dict]) -> None:
    """Within each group of ok rows: on the front of (max compression ratio, min Δppl)."""
    for g in {r["group"] for r in table}:
        members = [r for r in table if r["group"] == g and r["status"] == "ok"]
        pts = [(r.get("compression_ratio"), quality(r)) for r in members]
        pts = [(a if finite(a) else math.nan, b if b is not None else math.nan) for a, b in pts]
        front = set(pareto_front(pts, maximize=(True, False)))
        for i, r in enumerate(members):
            r["pareto"] = "★" if i in front else ""


def sort_key(row: dict):
    q = quality(row)
    return (row["group"], q is None, q if q is not None else 0.0, row["cache"] != BASELINE,
            -(row.get("compression_ratio") or 0.0))


def write_csv(table: list[dict], path: Path) -> None:
    metrics = sorted({k for r in table for k in r} - set(FIRST_CSV) - set(LAST_CSV) - {"kv_mb"})
    cols = FIRST_CSV + metrics + LAST_CSV
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in sorted(table, key=sort_key):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_text(path, buf.getvalue())


def cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or v == "":
        return "" if key != "delta_ppl" else "n/a"
    try:
        return fmt.format(v).replace("|", "\\|")
    except (ValueError, TypeError):
        return str(v)


def markdown(table: list[dict], source: str = "", command: str | None = None, plots: list[str] = ()) -> str:
    ok = [r for r in table if r["status"] == "ok"]
    failed = [r for r in table if r["status"] != "ok"]
    lines = ["# Sweep summary", ""]
    if command:
        lines += [f"Produced by `{command}`; rebuilt at any time with `kvc-report {source}`.", ""]
    elif source:
        lines += [f"Built by `kvc-report {source}`.", ""]
    lines += [f"{len(ok)} ok run(s), {len(failed)} failed. Δppl is against the `full` cache of the same model and "
              "eval settings; ratio = fp16 KV bytes / bytes held; ★ = on the Pareto front of (max ratio, min Δppl).",
              ""]
    lines += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
    for g in sorted({r["group"] for r in ok}):
        members = sorted((r for r in ok if r["group"] == g), key=sort_key)
        cols = [c for c in MD_COLUMNS if any(r.get(c[1]) not in (None, "") for r in members) or c[1] == "delta_ppl"]
        if any(finite(r.get("quality_dppl")) for r in members):  # speed runs: ppl of a few decoded tokens is noise
            cols = [c for c in cols if c[1] not in ("ppl", "delta_ppl", "delta_ppl_pct")]
        lines += [f"## {g}", "", "| " + " | ".join(h for h, _, _ in cols) + " |",
                  "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in cols) + " |" for r in members]
        front = sorted((r for r in members if r.get("pareto")), key=lambda r: r.get("compression_ratio") or 0.0)
        if front:
            lines += ["", "Pareto front (ratio up, Δppl down): " + " → ".join(
                f"{r['cache']} {r['settings']}".strip() + f" ({cell(r, 'compression_ratio', '{:.2f}x')}, "
                f"{quality(r):+.3f})" for r in front)]
        if not any(r["cache"] == BASELINE for r in members):
            lines += ["", f"_No `{BASELINE}` run in this group, so no Δppl (rows sorted by ppl)._"]
        lines.append("")
    if failed:
        lines += ["## Failed runs", "", "| model | eval | cache | settings | error |", "|---|---|---|---|---|"]
        for r in sorted(failed, key=lambda r: (r["group"], r["cache"] or "", r["settings"])):
            err = (r.get("error") or r.get("status") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['model']} | {r['eval']} | {r['cache']} | {r['settings']} | {err} |")
        lines.append("")
    return "\n".join(lines)


def atomic_text(path: Path, text: str) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
