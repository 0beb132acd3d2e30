"""Records -> one row per run: deduplicated, with Δppl against the full cache of the same model and eval."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from kvcompress.records import (
    AXES,
    CorruptLine,
    Records,
    flat,
    has_axes,
    read_records,
    record_settings,
    running_code_version,
    write_text_atomic,
)
from kvcompress.report.pareto import pareto_front

BASELINE = "full"
FIRST_CSV = ["status", "model", "eval", "cache", "settings", "storage", "policy", "layout", "ppl", "delta_ppl",
             "delta_ppl_pct", "compression_ratio", "kv_bytes_per_row", "kv_bytes_per_token", "kv_bytes_batch",
             "decode_tokens_per_s", "quality_dppl", "pareto", "warning", "baseline_ppl", "group", "error"]
LAST_CSV = ["cache_params", "storage_params", "policy_params", "layout_params", "eval_params", "dtype", "device",
            "seed", "config_hash", "data", "code_version", "host", "git_sha", "started_at", "duration_s"]
NOT_CSV = {"kv_mb_per_row", "quality_ci", "ppl_ci", "kv_bytes", "versions"}  # shown in markdown, or renamed
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


def presetless_settings(table: list[dict], recs: list[dict]) -> None:
    """Old records (cache + cache_params only, from before the three axes; their presets are gone): show the
    settings that vary between the rows of that cache, not every setting."""
    by_cache: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        if not has_axes(r) and r.get("cache"):
            by_cache.setdefault(r["cache"], []).append(i)
    for idx in by_cache.values():
        flats = [dict(flat(recs[i].get("cache_params") or {})) for i in idx]
        keys = list(dict.fromkeys(k for f in flats for k in f))  # first-seen order
        varying = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
        for i, f in zip(idx, flats, strict=True):
            table[i]["settings"] = " ".join(f"{k}={f.get(k)}" for k in varying)


def group_key(r: dict) -> str:
    """Runs are comparable (share a baseline) when model, dtype, eval and its settings match."""
    ev = " ".join(f"{k}={v}" for k, v in sorted((r.get("eval_params") or {}).items()))
    return f"{r.get('model')} {r.get('dtype')} eval={r.get('eval')} {ev}".strip()


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Table(list):
    """Rows of one code version: ``version``, ``why`` it was chosen, and ``others`` (version -> records) left out."""

    def __init__(self, items=(), version: str = UNKNOWN_VERSION, why: str = "", others: dict | None = None):
        super().__init__(items)
        self.version, self.why, self.others = version, why, dict(others or {})


def version_of(r: dict) -> str:
    return r.get("code_version") or UNKNOWN_VERSION


def choose_version(records: list[dict], asked: str | None = None, current: str | None = None) -> tuple[str, str]:
    """The code version a table shows, and why: ``asked``, else ``current`` (the code here) when any record has
    it, else the version of the newest record. A version asked for that no record has is an error."""
    present = list(dict.fromkeys(version_of(r) for r in records))
    if asked is not None:
        if asked not in present:
            raise ValueError(f"no record of code version {asked!r}; the records hold: {', '.join(present) or 'none'}")
        return asked, "asked for"
    if current is not None and current in present:
        return current, "the current code"
    newest = version_of(records[-1]) if records else UNKNOWN_VERSION
    why = "the newest records'" + (f"; no record of the current code `{current}`" if current else "")
    return newest, why


def rows(records: list[dict], version: str | None = None, current: str | None = "auto") -> Table:
    """Flat rows (one per distinct config) of ONE code version (``choose_version``; ``current="auto"`` asks git
    for the code here), with Δppl vs the group's full cache and the Pareto flag. A config with records of other
    versions only is a ``missing`` row: never filled in from another version."""
    current = running_code_version() if current == "auto" else current
    chosen, why = choose_version(records, version, current)
    mine = [r for r in records if version_of(r) == chosen]
    others: dict[str, int] = {}
    for r in records:
        if version_of(r) != chosen:
            others[version_of(r)] = others.get(version_of(r), 0) + 1
    recs = latest(mine)
    base: dict[str, float] = {}
    for r in recs:
        ppl = (r.get("metrics") or {}).get("ppl")
        if r.get("status") == "ok" and r.get("cache") == BASELINE and finite(ppl):
            base[group_key(r)] = ppl
    out = [row_of(r, base.get(group_key(r))) for r in recs]
    presetless_settings(out, recs)
    for row in out:  # a speed run's quality: Δppl of the same settings under a quality eval (not its few tokens)
        if row["status"] == "ok" and finite(row.get("decode_tokens_per_s")):
            source = quality_eval_row(row, out)
            row["quality_dppl"] = source["delta_ppl"] if source else None
            row["quality_ci"] = source["quality_ci"] if source else None
    mark_pareto(out)
    have = {r.get("config_hash") for r in mine}
    for r in latest([r for r in records if r.get("config_hash") and r.get("config_hash") not in have]):
        versions = sorted({version_of(x) for x in records if x.get("config_hash") == r.get("config_hash")})
        out.append({"status": "missing", "model": r.get("model"), "eval": r.get("eval"), "cache": r.get("cache"),
                    "settings": record_settings(r), "group": group_key(r), "config_hash": r.get("config_hash"),
                    "error": f"no record of code version {chosen} (records of {', '.join(versions)})",
                    "code_version": chosen, **{axis: r.get(axis) for axis in AXES}})
    return Table(out, chosen, why, others)


def host_name(r: dict) -> str | None:
    h = r.get("host") or {}
    return f"{h.get('cpu', '?')} ({h.get('isa', '?')}, {h.get('threads', '?')} threads)" if h else None


def row_of(r: dict, baseline: float | None) -> dict:
    m = r.get("metrics") or {}
    row = {"status": r.get("status"), "model": r.get("model"), "eval": r.get("eval"), "cache": r.get("cache"),
           "settings": record_settings(r), "group": group_key(r), "error": r.get("error"), **m}
    row.update({k: r.get(k) for k in LAST_CSV})
    row.update({axis: r.get(axis) for axis in AXES})
    row["code_version"] = version_of(r)
    row["host"] = host_name(r)
    row["warning"] = "; ".join(r.get("warnings") or []) or None
    for key in ("cache_params", "eval_params", "data"):
        row[key] = json.dumps(r.get(key) or {}, sort_keys=True)
    for key in (f"{axis}_params" for axis in AXES):  # None in old records (no axes)
        row[key] = json.dumps(r[key], sort_keys=True) if r.get(key) is not None else None
    row["baseline_ppl"] = baseline
    if baseline is not None and finite(m.get("ppl")) and r.get("status") == "ok":
        row["delta_ppl"] = m["ppl"] - baseline
        row["delta_ppl_pct"] = 100 * (m["ppl"] - baseline) / baseline
    ci = metric_ci(m, "ppl")
    row["quality_ci"] = shifted(ci, baseline if "delta_ppl" in row else 0.0)
    n = m.get("n_windows")
    row["ppl_ci"] = (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"n={n}" if finite(n) and n < 2 else None) \
        if finite(m.get("ppl")) else None
    row.pop("kv_bytes", None)  # the whole batch's: renamed, and shown per row and per token
    if finite(m.get("kv_bytes")):
        row["kv_bytes_batch"] = m["kv_bytes"]
    if finite(m.get("kv_bytes_per_row")):
        row["kv_mb_per_row"] = m["kv_bytes_per_row"] / 1e6
    return row


def metric_ci(metrics: dict, name: str) -> tuple[float, float] | None:
    """The interval recorded as ``<name>/ci_low``, ``<name>/ci_high`` (eval/stats.py), if both are finite and it
    could be estimated: an interval over fewer than 2 windows (an old record's zero-width one) is no interval."""
    lo, hi = metrics.get(f"{name}/ci_low"), metrics.get(f"{name}/ci_high")
    n = metrics.get("n_windows")
    if finite(n) and n < 2:
        return None
    return (float(lo), float(hi)) if finite(lo) and finite(hi) else None


def shifted(ci: tuple[float, float] | None, by: float | None) -> tuple[float, float] | None:
    return None if ci is None or by is None else (ci[0] - by, ci[1] - by)


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
    """Within each group of ok rows without a warning: on the front of (max compression ratio, min Δppl). A row
    with a warning (its policy never evicted) is no clean result and is never on the front."""
    for g in {r["group"] for r in table}:
        members = [r for r in table if r["group"] == g and r["status"] == "ok" and not r.get("warning")]
        for r in table:
            if r["group"] == g and r["status"] == "ok" and r.get("warning"):
                r["pareto"] = ""
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
    metrics = sorted({k for r in table for k in r} - set(FIRST_CSV) - set(LAST_CSV) - NOT_CSV)
    cols = FIRST_CSV + metrics + LAST_CSV
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in sorted(table, key=sort_key):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_text(path, buf.getvalue())


def quality_interval(row: dict) -> tuple[float, float] | None:
    """The interval of ``quality(row)`` where the records carry one (``ppl/ci_low``, ``ppl/ci_high``)."""
    ci = row.get("quality_ci")
    return tuple(ci) if ci and all(finite(x) for x in ci) else None


def has_baseline(members: list[dict]) -> bool:
    """Quality is a Δppl (against ``full``, or the quality eval's Δppl for speed rows) for every ranked row."""
    return all(finite(r.get("quality_dppl")) or finite(r.get("delta_ppl")) for r in members if quality(r) is not None)


atomic_text = write_text_atomic  # summary.md, summary.csv: never half-written
