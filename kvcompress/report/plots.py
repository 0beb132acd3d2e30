"""PNG plots: compression ratio vs Δppl (Pareto front marked) and decode tokens/s vs Δppl."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

from kvcompress.report.pareto import pareto_front
from kvcompress.report.table import finite, quality

RATIO_PLOT = "ratio_vs_dppl.png"
SPEED_PLOT = "speed_vs_dppl.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label(row: dict) -> str:
    s = row.get("settings") or ""
    return f"{row['cache']} {s}".strip() if len(s) <= 28 else f"{row['cache']} {s[:26]}…"


def _scatter(ax, rows: list[dict], xs: list[float], ys: list[float], maximize_y: bool = True) -> None:
    caches = sorted({r["cache"] for r in rows})
    cmap = _plt().get_cmap("tab20")
    markers = "os^Dv<>pPX*h"
    for i, c in enumerate(caches):
        idx = [j for j, r in enumerate(rows) if r["cache"] == c]
        ax.scatter([xs[j] for j in idx], [ys[j] for j in idx], color=cmap(i % 20), marker=markers[i % len(markers)],
                   s=36, label=c, zorder=3, edgecolors="black" if c == "full" else "none")
    front = sorted(pareto_front(list(zip(xs, ys, strict=True)), maximize=(False, maximize_y)), key=lambda j: xs[j])
    if front:
        ax.step([xs[j] for j in front], [ys[j] for j in front], where="post", color="crimson", lw=1.5, zorder=2,
                label="Pareto front")
        ax.scatter([xs[j] for j in front], [ys[j] for j in front], s=140, facecolors="none", edgecolors="crimson",
                   lw=1.5, zorder=4)
        for j in front:
            ax.annotate(label(rows[j]), (xs[j], ys[j]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    _xscale(ax, xs)
    ax.axvline(0, color="grey", lw=0.8, ls="--", zorder=1)
    ax.grid(alpha=0.3)


def _xscale(ax, xs: list[float]) -> None:
    """Symlog x when a few bad runs would squash the rest against zero."""
    nz = sorted(abs(x) for x in xs if x)
    if len(nz) >= 3 and nz[-1] > 10 * nz[len(nz) // 2]:
        ax.set_xscale("symlog", linthresh=max(nz[len(nz) // 4], 1e-3))


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    _plt().close(fig)
    os.replace(tmp, path)


def _empty(path: Path, message: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    _save(fig, path)


def _xlabel(rows: list[dict]) -> str:
    return "Δppl vs full cache (lower is better)" if all("delta_ppl" in r for r in rows) else "ppl (no full baseline)"


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
    fig, axes = plt.subplots(1, len(groups), figsize=(7.5 * len(groups), 5.5), squeeze=False)
    for ax, (g, rows) in zip(axes[0], sorted(groups.items()), strict=True):
        _scatter(ax, rows, [quality(r) for r in rows], [r["compression_ratio"] for r in rows])
        ax.set(xlabel=_xlabel(rows), ylabel="compression ratio (fp16 bytes / bytes held)",
               title=textwrap.fill(g, 70))
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def speed_plot(table: list[dict], path: Path) -> None:
    rows = [r for r in table if r["status"] == "ok" and finite(r.get("decode_tokens_per_s"))]
    xs = [quality(r) for r in rows]
    rows, xs = [r for r, x in zip(rows, xs, strict=True) if x is not None], [x for x in xs if x is not None]
    if not rows:
        return _empty(path, "no ok runs with decode tokens/s (run eval=speed)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    _scatter(ax, rows, xs, [r["decode_tokens_per_s"] for r in rows])
    devices = sorted({str(r.get("device")) for r in rows})
    ax.set(xlabel="Δppl vs full cache (eval=ppl of the same settings where run, else the speed run's own)",
           ylabel="decode tokens/s",
           title=f"decode speed vs quality ({', '.join(sorted({r['model'] for r in rows}))}; {', '.join(devices)})")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)
