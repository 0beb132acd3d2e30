"""PNG plots: compression ratio vs Δppl (Pareto front marked) and decode tokens/s vs Δppl.

Every (strategy, settings) point has one colour (by strategy) and one marker (by its settings within the
strategy) in every panel and plot of a report; error bars where the records carry ``<metric>/ci_low`` and
``<metric>/ci_high``; without a ``full`` baseline the x axis says ppl, not Δppl.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from kvcompress.records import write_atomic
from kvcompress.report.pareto import pareto_front
from kvcompress.report.table import finite, has_baseline, metric_ci, quality, quality_interval

RATIO_PLOT = "ratio_vs_dppl.png"
SPEED_PLOT = "speed_vs_dppl.png"
MARKERS = "os^Dv<>pPX*hH8d"
LABEL_CHARS = 34


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(row: dict) -> str:
    s = row.get("settings") or ""
    text = f"{row['cache']} {s}".strip()
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def styles(table: list[dict]) -> dict[str, tuple[tuple, str]]:
    """(colour, marker) per point label, for every ok row of a report: a strategy's colour, and a marker per
    setting of that strategy, the same in every panel."""
    cmap = _plt().get_cmap("tab10" if len({r["cache"] for r in table}) <= 10 else "tab20")
    caches = sorted({r["cache"] for r in table if r.get("status") == "ok"}, key=lambda c: (c != "full", c))
    out = {}
    for i, cache in enumerate(caches):
        labels = sorted({label(r) for r in table if r.get("status") == "ok" and r["cache"] == cache})
        for j, lab in enumerate(labels):
            out[lab] = (cmap(i % cmap.N), MARKERS[j % len(MARKERS)])
    return out


def _err(values: list[float], cis: list[tuple[float, float] | None]):
    """Asymmetric error bars (2, N) for matplotlib, or None when no point has an interval."""
    if not any(cis):
        return None
    lo = [max(0.0, v - c[0]) if c else 0.0 for v, c in zip(values, cis, strict=True)]
    hi = [max(0.0, c[1] - v) if c else 0.0 for v, c in zip(values, cis, strict=True)]
    return [lo, hi]


def _annotate(ax, rows: list[dict], xs: list[float], ys: list[float], idx: list[int]) -> None:
    """Labels of the front points, nudged apart vertically so they do not overlap, never clipped."""
    taken: list[tuple[float, float]] = []
    ax.figure.canvas.draw()
    for j in sorted(idx, key=lambda j: (ys[j], xs[j])):
        px, py = ax.transData.transform((xs[j], ys[j]))
        dy = 4
        while any(abs(py + dy - ty) < 11 and abs(px - tx) < 7 * LABEL_CHARS for tx, ty in taken):
            dy += 11
        taken.append((px, py + dy))
        ax.annotate(label(rows[j]), (xs[j], ys[j]), fontsize=7, xytext=(5, dy), textcoords="offset points",
                    annotation_clip=False, arrowprops=dict(arrowstyle="-", lw=0.4, color="grey") if dy > 15 else None)


def _scatter(ax, rows: list[dict], xs: list[float], ys: list[float], style: dict, maximize_y: bool = True,
             xci=None, yci=None) -> None:
    seen = set()
    for j, r in enumerate(rows):
        lab = label(r)
        colour, marker = style.get(lab, ("grey", "o"))
        ax.scatter([xs[j]], [ys[j]], color=colour, marker=marker, s=40, zorder=3, label=None if lab in seen else lab,
                   edgecolors="black" if r["cache"] == "full" else "none")
        seen.add(lab)
    xerr, yerr = _err(xs, xci or [None] * len(xs)), _err(ys, yci or [None] * len(ys))
    if xerr or yerr:
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor="grey", elinewidth=0.8, capsize=2, zorder=2)
    front = sorted(pareto_front(list(zip(xs, ys, strict=True)), maximize=(False, maximize_y)), key=lambda j: xs[j])
    if front:
        ax.step([xs[j] for j in front], [ys[j] for j in front], where="post", color="crimson", lw=1.5, zorder=2,
                label="Pareto front")
        ax.scatter([xs[j] for j in front], [ys[j] for j in front], s=140, facecolors="none", edgecolors="crimson",
                   lw=1.5, zorder=4)
    _xscale(ax, xs)
    ax.margins(x=0.12, y=0.12)
    if min(xs) < 0 < max(xs) or has_baseline(rows):
        ax.axvline(0, color="grey", lw=0.8, ls="--", zorder=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if front:
        _annotate(ax, rows, xs, ys, front)


def _xscale(ax, xs: list[float]) -> None:
    """Symlog x when a few bad runs would squash the rest against zero."""
    nz = sorted(abs(x) for x in xs if x)
    if len(nz) >= 3 and nz[-1] > 10 * nz[len(nz) // 2]:
        ax.set_xscale("symlog", linthresh=max(nz[len(nz) // 4], 1e-3))


def _save(fig, path: Path) -> None:
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight"))
    finally:
        _plt().close(fig)


def _empty(path: Path, message: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    _save(fig, path)


def xlabel(rows: list[dict], speed: bool = False) -> str:
    """Δppl where every point has a baseline; otherwise the raw ppl, said so."""
    if not has_baseline(rows):
        return "ppl (no full baseline in this group, so no Δppl; lower is better)"
    if speed:
        return "Δppl vs full cache (eval=ppl of the same settings where run, else the speed run's own)"
    return "Δppl vs full cache (lower is better)"


def ratio_plot(table: list[dict], path: Path) -> None:
    """One panel per comparable group with a ratio: y = compression ratio, x = Δppl."""
    groups = {}
    for r in table:
        if r["status"] == "ok" and finite(r.get("compression_ratio")) and quality(r) is not None:
            groups.setdefault(r["group"], []).append(r)
    # speed groups ranked by their ppl eval's Δppl repeat the ppl panel: keep them only when alone
    own = {g: rs for g, rs in groups.items() if not any(finite(r.get("quality_dppl")) for r in rs)}
    groups = own or groups
    if not groups:
        return _empty(path, "no ok runs with a compression ratio and a perplexity")
    plt = _plt()
    style = styles(table)
    fig, axes = plt.subplots(1, len(groups), figsize=(9.5 * len(groups), 5.5), squeeze=False)
    for ax, (g, rows) in zip(axes[0], sorted(groups.items()), strict=True):
        _scatter(ax, rows, [quality(r) for r in rows], [r["compression_ratio"] for r in rows], style,
                 xci=[quality_interval(r) for r in rows],
                 yci=[metric_ci(r, "compression_ratio") for r in rows])
        ax.set(xlabel=xlabel(rows), ylabel="compression ratio (fp16 bytes / bytes held)", title=textwrap.fill(g, 70))
        ax.title.set_fontsize(8)
    fig.tight_layout()
    _save(fig, path)


def speed_plot(table: list[dict], path: Path) -> None:
    rows = [r for r in table if r["status"] == "ok" and finite(r.get("decode_tokens_per_s"))]
    rows = [r for r in rows if quality(r) is not None]
    if not rows:
        return _empty(path, "no ok runs with decode tokens/s (run eval=speed)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    xs = [quality(r) for r in rows]
    _scatter(ax, rows, xs, [r["decode_tokens_per_s"] for r in rows], styles(table),
             xci=[quality_interval(r) for r in rows], yci=[metric_ci(r, "decode_tokens_per_s") for r in rows])
    devices = sorted({str(r.get("device")) for r in rows})
    ax.set(xlabel=xlabel(rows, speed=True), ylabel="decode tokens/s",
           title=f"decode speed vs quality ({', '.join(sorted({r['model'] for r in rows}))}; {', '.join(devices)})")
    ax.title.set_fontsize(8)
    fig.tight_layout()
    _save(fig, path)


def series_plot(panels: list[dict], path: Path, columns: int = 1, size=(7, 4.5)) -> None:
    """A results folder's plot (``kvc-report --table``), ``columns`` panels a row. A panel: ``series`` (per series
    ``name``, ``marker``, ``xs``, ``ys``, and per point an optional ``labels`` text and ``intervals`` (low, high) of
    y: points with their bars and labels), ``xlabel``, ``ylabel``, ``title``, ``ylim``, a dashed baseline ``hline``
    = (y, name), ``yscale`` as matplotlib names it (``symlog`` for Δppl that spans decades), ``label_size``."""
    plt = _plt()
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size[0], size[1] * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        _panel(ax, panel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path)


def _panel(ax, p: dict) -> None:
    if p.get("hline") is not None:
        ax.axhline(p["hline"][0], color="grey", ls="--", lw=1, label=p["hline"][1] or None)
    for s in p["series"]:
        cis = s.get("intervals") or [None] * len(s["ys"])
        ax.errorbar(s["xs"], s["ys"], yerr=_err(s["ys"], cis), fmt=s.get("marker", "o"), capsize=3, alpha=0.8,
                    label=s.get("name") or None)
        for x, y, text in zip(s["xs"], s["ys"], s.get("labels") or [], strict=False):
            if text:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=p.get("label_size", 8))
    ax.set(xlabel=p.get("xlabel", ""), ylabel=p.get("ylabel", ""), title=p.get("title", ""),
           yscale=p.get("yscale", "linear"))
    if p.get("ylim") is not None:
        ax.set_ylim(*p["ylim"])
    if any(s.get("name") for s in p["series"]) or (p.get("hline") and p["hline"][1]):
        ax.legend()
    ax.grid(alpha=0.3)


def bar_plot(groups: list[str], series: list[dict], path: Path, ylabel: str, title: str = "", top: float | None = None,
             ylim=None, hline: tuple[float, str] | None = None, size=(10, 4)) -> None:
    """Grouped bars (``kvc-report --table``): one bar per series (``name``, ``values``) in each group; a bar above
    ``top`` is cut there and labelled with its value (an off-scale policy must not squash the others)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=size)
    width = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ys = s["values"]
        ax.bar(xs, [min(y, top) if top else y for y in ys], width, label=s.get("name") or None)
        for x, y in zip(xs, ys, strict=True):
            if top and y > top:
                ax.text(x, top * 0.98, f"{y:.0f}", ha="center", va="top", fontsize=7, rotation=90)
    if hline is not None:
        ax.axhline(hline[0], color="k", lw=1, ls="--", label=hline[1] or None)
    ax.set_xticks(range(len(groups)), groups, rotation=40, ha="right")
    ax.set(ylabel=ylabel, title=title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
