"""Records -> one row per run: deduplicated, with Δppl against the full cache of the same model and eval."""
from __future__ import annotations

import csv
import functools
import io
import json
import math
from pathlib import Path

from kvcompress.records import CorruptLine, Records, read_records
from kvcompress.report.pareto import pareto_front

BASELINE = "full"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # settings are shown relative to conf/<group>/*.yaml
AXES = ("storage", "policy", "layout")  # records of the composed cache name each axis and its settings
# summary.md columns: (header, row key, format)
MD_COLUMNS = [("cache", "cache", "{}"), ("settings", "settings", "{}"), ("ppl", "ppl", "{:.3f}"),
              ("Δppl", "delta_ppl", "{:+.3f}"), ("Δppl %", "delta_ppl_pct", "{:+.2f}"),
              ("Δppl (ppl eval)", "quality_dppl", "{:+.3f}"),
              ("ratio", "compression_ratio", "{:.2f}x"), ("KV MB", "kv_mb", "{:.2f}"),
              ("decode tok/s", "decode_tokens_per_s", "{:.1f}"), ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
              ("Pareto", "pareto", "{}"), ("time s", "duration_s", "{:.1f}")]
FIRST_CSV = ["status", "model", "eval", "cache", "settings", "storage", "policy", "layout", "ppl", "delta_ppl",
             "delta_ppl_pct", "compression_ratio", "kv_bytes", "decode_tokens_per_s", "quality_dppl", "pareto",
             "baseline_ppl", "group", "error"]
LAST_CSV = ["cache_params", "storage_params", "policy_params", "layout_params", "eval_params", "dtype", "device",
            "seed", "config_hash", "code_version", "git_sha", "started_at", "duration_s"]
UNKNOWN_VERSION = "unknown"  # records written before code_version was recorded


def load(path: Path) -> Records:
    """Records under ``path``: a JSONL file, every ``*.jsonl`` under a folder, else every ``record.json``.

    Lines or files that are not JSON records are listed in ``.corrupt`` (file, line) and warned about.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    records = read_records(path)
    if not records and path.is_dir():
        for f in sorted(path.rglob("record.json")):
            try:
                records.append(json.loads(f.read_text()))
            except json.JSONDecodeError:
                records.corrupt.append(CorruptLine(f, 1, f.read_text()[:80]))
    return records


def latest(records: list[dict]) -> list[dict]:
    """One record per config hash: the last ok one if any, else the last one (records are in write order)."""
    chosen: dict[str, dict] = {}
    for i, r in enumerate(records):
        key = r.get("config_hash") or f"#{i}"
        if key not in chosen or r.get("status") == "ok" or chosen[key].get("status") != "ok":
            chosen[key] = r
    return list(chosen.values())


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    return out


def settings(params: dict | None, cache: str | None = None, group: str = "cache") -> str:
    """``budget=0.25 storage=int4`` (nested dicts flattened with dots).

    With ``cache`` (a ``conf/<group>/<cache>.yaml`` name) only the settings that differ from that file.
    """
    defaults = dict(_flat(cache_defaults(cache, group))) if cache else {}
    return " ".join(f"{k}={v}" for k, v in _flat(params or {}) if k not in defaults or defaults[k] != v)


def has_axes(r: dict) -> bool:
    """A record of the composed cache (storage/policy/layout fields), not an old one with cache/cache_params only."""
    return any(r.get(axis) for axis in AXES)


def record_settings(r: dict) -> str:
    """The settings that differ from the presets: per axis (``conf/<axis>/<name>.yaml``) for composed-cache
    records, else against ``conf/cache/<cache>.yaml``."""
    if not has_axes(r):
        return settings(r.get("cache_params"), r.get("cache"))
    parts = [settings(r.get(f"{axis}_params"), r.get(axis), axis) for axis in AXES]
    return " ".join(p for p in parts if p)


def presetless_settings(table: list[dict], recs: list[dict]) -> None:
    """Old records (cache + cache_params only) whose ``conf/cache/<name>.yaml`` is gone: show the settings that
    vary between the rows of that cache, not every setting."""
    by_cache: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        if not has_axes(r) and r.get("cache") and not cache_defaults(r["cache"]):
            by_cache.setdefault(r["cache"], []).append(i)
    for idx in by_cache.values():
        flats = [dict(_flat(recs[i].get("cache_params") or {})) for i in idx]
        keys = list(dict.fromkeys(k for f in flats for k in f))  # first-seen order
        varying = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
        for i, f in zip(idx, flats, strict=True):
            table[i]["settings"] = " ".join(f"{k}={f.get(k)}" for k in varying)


@functools.cache
def cache_defaults(cache: str, group: str = "cache") -> dict:
    """The settings of ``conf/<group>/<cache>.yaml`` ({} when there is no such file)."""
    path = CONF_DIR / group / f"{cache}.yaml"
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
               "settings": record_settings(r), "group": group_key(r), "error": r.get("error"), **m}
        row.update({k: r.get(k) for k in LAST_CSV})
        row.update({axis: r.get(axis) for axis in AXES})
        row["code_version"] = r.get("code_version") or UNKNOWN_VERSION
        for key in ("cache_params", "eval_params"):
            row[key] = json.dumps(r.get(key) or {}, sort_keys=True)
        for key in (f"{axis}_params" for axis in AXES):  # None in old records (no axes)
            row[key] = json.dumps(r[key], sort_keys=True) if r.get(key) is not None else None
        b = base.get(row["group"])
        row["baseline_ppl"] = b
        if b is not None and finite(m.get("ppl")) and r.get("status") == "ok":
            row["delta_ppl"] = m["ppl"] - b
            row["delta_ppl_pct"] = 100 * (m["ppl"] - b) / b
        row["quality_ci"] = shifted(metric_ci(m, "ppl"), b if "delta_ppl" in row else 0.0)
        if finite(m.get("kv_bytes")):
            row["kv_mb"] = m["kv_bytes"] / 1e6
        out.append(row)
    presetless_settings(out, recs)
    for row in out:  # a speed run's quality: Δppl of the same settings under a quality eval (not its few tokens)
        if row["status"] == "ok" and finite(row.get("decode_tokens_per_s")):
            source = quality_eval_row(row, out)
            row["quality_dppl"] = source["delta_ppl"] if source else None
            row["quality_ci"] = source["quality_ci"] if source else None
    mark_pareto(out)
    return out


def metric_ci(metrics: dict, name: str) -> tuple[float, float] | None:
    """The interval recorded as ``<name>/ci_low``, ``<name>/ci_high`` (eval/stats.py), if both are finite."""
    lo, hi = metrics.get(f"{name}/ci_low"), metrics.get(f"{name}/ci_high")
    return (float(lo), float(hi)) if finite(lo) and finite(hi) else None


def shifted(ci: tuple[float, float] | None, by: float | None) -> tuple[float, float] | None:
    return None if ci is None or by is None else (ci[0] - by, ci[1] - by)


def quality_eval_delta(row: dict, table: list[dict]) -> float | None:
    source = quality_eval_row(row, table)
    return source["delta_ppl"] if source else None


def quality_eval_row(row: dict, table: list[dict]) -> dict | None:
    """The row of the same model, dtype and cache settings in a group without decode speed (``eval=ppl`` first)
    that has a Δppl."""
    same = [r for r in table if r is not row and r["status"] == "ok" and finite(r.get("delta_ppl"))
            and not finite(r.get("decode_tokens_per_s"))
            and (r["model"], r.get("dtype"), r["cache"], r["cache_params"])
            == (row["model"], row.get("dtype"), row["cache"], row["cache_params"])]
    same.sort(key=lambda r: (r["eval"] != "ppl", r["group"]))
    return same[0] if same else None


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
    metrics = sorted({k for r in table for k in r} - set(FIRST_CSV) - set(LAST_CSV) - {"kv_mb", "quality_ci"})
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


def quality_interval(row: dict) -> tuple[float, float] | None:
    """The interval of ``quality(row)`` where the records carry one (``ppl/ci_low``, ``ppl/ci_high``)."""
    ci = row.get("quality_ci")
    return tuple(ci) if ci and all(finite(x) for x in ci) else None


def overlapping(front: list[dict]) -> list[tuple[dict, dict]]:
    """Neighbouring front points whose quality intervals overlap: the data cannot tell them apart."""
    out = []
    for a, b in zip(front, front[1:], strict=False):
        ia, ib = quality_interval(a), quality_interval(b)
        if ia and ib and ia[0] <= ib[1] and ib[0] <= ia[1]:
            out.append((a, b))
    return out


def has_baseline(members: list[dict]) -> bool:
    """Quality is a Δppl (against ``full``, or the quality eval's Δppl for speed rows) for every ranked row."""
    return all(finite(r.get("quality_dppl")) or finite(r.get("delta_ppl")) for r in members if quality(r) is not None)


def name(row: dict) -> str:
    return f"{row['cache']} {row['settings']}".strip()


def pareto_line(members: list[dict]) -> list[str]:
    front = sorted((r for r in members if r.get("pareto")), key=lambda r: r.get("compression_ratio") or 0.0)
    if not front:
        return []
    what = "Δppl" if has_baseline(members) else "ppl, no full baseline"
    fmt = "{:+.3f}" if has_baseline(members) else "{:.3f}"
    lines = ["", f"Pareto front (ratio up, {what} down): " + " → ".join(
        f"{name(r)} ({cell(r, 'compression_ratio', '{:.2f}x')}, {fmt.format(quality(r))})" for r in front)]
    pairs = overlapping(front)
    if pairs:
        lines += ["", "Intervals overlap (95% bootstrap; not distinguishable on this data): " + "; ".join(
            f"{name(a)} ~ {name(b)}" for a, b in pairs) + "."]
    return lines


def version_lines(rows_: list[dict], scope: str) -> list[str]:
    """Which code versions the rows come from (``scope="all"``), and a warning when they mix several."""
    counts: dict[str, int] = {}
    for r in rows_:
        v = r.get("code_version") or UNKNOWN_VERSION
        counts[v] = counts.get(v, 0) + 1
    listed = ", ".join(f"`{v}` ({n} row{'s' * (n != 1)})" for v, n in sorted(counts.items(), key=lambda x: -x[1]))
    if len(counts) > 1:
        return [f"⚠ {'These rows mix' if scope == 'all' else 'This table mixes'} {len(counts)} code versions: "
                f"{listed}; numbers (times above all) may not be comparable across versions (re-run with force=true)."]
    return [f"Code version: {listed}."] if scope == "all" and counts else []


def corrupt_lines(corrupt) -> list[str]:
    if not corrupt:
        return []
    shown = "; ".join(f"`{c.file}:{c.line}`" for c in corrupt[:10]) + (" ..." if len(corrupt) > 10 else "")
    return [f"⚠ {len(corrupt)} corrupt line{'s' * (len(corrupt) != 1)} in the records skipped (not JSON records, "
            f"e.g. an interrupted write): {shown}.", ""]


def markdown(table: list[dict], source: str = "", command: str | None = None, plots: list[str] = (),
             corrupt=()) -> str:
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
    lines += corrupt_lines(corrupt)
    lines += [*version_lines(table, "all"), ""]
    lines += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
    for g in sorted({r["group"] for r in ok}):
        members = sorted((r for r in ok if r["group"] == g), key=sort_key)
        cols = [c for c in MD_COLUMNS if any(r.get(c[1]) not in (None, "") for r in members) or c[1] == "delta_ppl"]
        if any(finite(r.get("quality_dppl")) for r in members):  # speed runs: ppl of a few decoded tokens is noise
            cols = [c for c in cols if c[1] not in ("ppl", "delta_ppl", "delta_ppl_pct")]
        lines += [f"## {g}", "", "| " + " | ".join(h for h, _, _ in cols) + " |",
                  "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in cols) + " |" for r in members]
        lines += pareto_line(members)
        if mixed := version_lines(members, "group"):
            lines += ["", *mixed]
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
