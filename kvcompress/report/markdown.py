"""summary.md: one table per group of comparable runs (same model, dtype, eval settings) of one code version,
its Pareto front, warnings, failed and missing runs."""
from __future__ import annotations

from kvcompress.report.table import BASELINE, finite, has_baseline, quality, quality_interval, sort_key

# summary.md columns: (header, row key, format)
MD_COLUMNS = [("cache", "cache", "{}"), ("settings", "settings", "{}"), ("ppl", "ppl", "{:.3f}"),
              ("Δppl", "delta_ppl", "{:+.3f}"), ("Δppl %", "delta_ppl_pct", "{:+.2f}"),
              ("Δppl (ppl eval)", "quality_dppl", "{:+.3f}"),
              ("ppl 95% CI", "ppl_ci", "{}"), ("ratio", "compression_ratio", "{:.2f}x"),
              ("KV MB/row", "kv_mb_per_row", "{:.3f}"), ("KV B/token", "kv_bytes_per_token", "{:.1f}"),
              ("decode tok/s", "decode_tokens_per_s", "{:.1f}"), ("prefill tok/s", "prefill_tokens_per_s", "{:.0f}"),
              ("Pareto", "pareto", "{}"), ("time s", "duration_s", "{:.1f}"), ("⚠", "warning", "{}")]


def cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or v == "":
        return "" if key != "delta_ppl" else "n/a"
    if key == "warning":  # the text follows the table
        return "⚠"
    try:
        return fmt.format(v).replace("|", "\\|")
    except (ValueError, TypeError):
        return str(v)


def overlapping(front: list[dict]) -> list[tuple[dict, dict]]:
    """Neighbouring front points whose quality intervals overlap: the data cannot tell them apart."""
    out = []
    for a, b in zip(front, front[1:], strict=False):
        ia, ib = quality_interval(a), quality_interval(b)
        if ia and ib and ia[0] <= ib[1] and ib[0] <= ia[1]:
            out.append((a, b))
    return out


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


def version_lines(table: list[dict]) -> list[str]:
    """Which code version the table shows and why, and the versions of the records it leaves out."""
    version, why = getattr(table, "version", None), getattr(table, "why", "")
    if version is None:
        return []
    lines = [f"Code version: `{version}` ({why}); every row comes from a record of this version."]
    others = getattr(table, "others", {})
    if others:
        listed = ", ".join(f"`{v}` ({n} record{'s' * (n != 1)})" for v, n in others.items())
        lines += ["", f"Records of other code versions left out: {listed}; `kvc-report <folder> --code-version "
                      "<version>` builds the table of one of them."]
    return lines


def host_lines(table: list[dict]) -> list[str]:
    """The machines the rows ran on: low-bit (quantized) numbers may move across processors and thread counts."""
    hosts: dict[str, int] = {}
    for r in table:
        if r.get("host") and r["status"] == "ok":
            hosts[r["host"]] = hosts.get(r["host"], 0) + 1
    if not hosts:
        return []
    listed = "; ".join(f"{h} ({n} row{'s' * (n != 1)})" for h, n in hosts.items())
    if len(hosts) == 1:
        return [f"Host: {listed}."]
    return [f"⚠ Rows from {len(hosts)} hosts: {listed}. Quantized numbers may differ across machines by more than "
            "the full cache's (see README, results)."]


def corrupt_lines(corrupt) -> list[str]:
    if not corrupt:
        return []
    shown = "; ".join(f"`{c.file}:{c.line}`" for c in corrupt[:10]) + (" ..." if len(corrupt) > 10 else "")
    return [f"⚠ {len(corrupt)} corrupt line{'s' * (len(corrupt) != 1)} in the records skipped (not JSON records, "
            f"e.g. an interrupted write): {shown}.", ""]


def markdown(table: list[dict], source: str = "", command: str | None = None, plots: list[str] = (),
             corrupt=()) -> str:
    ok = [r for r in table if r["status"] == "ok"]
    missing = [r for r in table if r["status"] == "missing"]
    failed = [r for r in table if r["status"] not in ("ok", "missing")]
    lines = ["# Sweep summary", ""]
    if command:
        lines += [f"Produced by `{command}`; rebuilt at any time with `kvc-report {source}`.", ""]
    elif source:
        lines += [f"Built by `kvc-report {source}`.", ""]
    lines += [f"{len(ok)} ok run(s), {len(failed)} failed, {len(missing)} missing. Δppl is against the `full` "
              "cache of the same model and eval settings; ratio = fp16 KV bytes / bytes held; KV MB/row = the bytes "
              "held per batch row; ★ = on the Pareto front of (max ratio, min Δppl).", ""]
    lines += corrupt_lines(corrupt)
    lines += [*version_lines(table), ""]
    if hosts := host_lines(table):
        lines += [*hosts, ""]
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
        if warned := [r for r in members if r.get("warning")]:
            lines += ["", f"⚠ {len(warned)} row(s) carry a warning (not clean results, never on the front): " +
                      "; ".join(f"{name(r)}: {r['warning']}" for r in warned)]
        if not any(r["cache"] == BASELINE for r in members):
            lines += ["", f"_No `{BASELINE}` run in this group, so no Δppl (rows sorted by ppl)._"]
        lines.append("")
    if failed:
        lines += ["## Failed runs", "", "| model | eval | cache | settings | error |", "|---|---|---|---|---|"]
        for r in sorted(failed, key=lambda r: (r["group"], r["cache"] or "", r["settings"])):
            err = (r.get("error") or r.get("status") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['model']} | {r['eval']} | {r['cache']} | {r['settings']} | {err} |")
        lines.append("")
    if missing:
        lines += [f"## Missing: no record of code version `{getattr(table, 'version', '?')}`", "",
                  "| model | eval | cache | settings | records of |", "|---|---|---|---|---|"]
        for r in sorted(missing, key=lambda r: (r["group"], r["cache"] or "", r["settings"])):
            lines.append(f"| {r['model']} | {r['eval']} | {r['cache']} | {r['settings']} | "
                         f"{r['error'].rsplit('records of ', 1)[-1].rstrip(')')} |")
        lines.append("")
    return "\n".join(lines)
