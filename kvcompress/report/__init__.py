"""Sweep reports: records -> summary.csv, summary.md and Pareto plots (``kvc-report``, Hydra callback)."""
from __future__ import annotations

import json
from pathlib import Path

from kvcompress.report.markdown import markdown
from kvcompress.report.pareto import dominates, pareto_front
from kvcompress.report.plots import RATIO_PLOT, SPEED_PLOT, ratio_plot, speed_plot
from kvcompress.report.table import atomic_text, load, rows, write_csv

SWEEP_FILE = "sweep.json"  # the command that produced the records (written by the sweep callback)
__all__ = ["build_report", "dominates", "pareto_front", "rows", "load"]


def build_report(source: Path, out_dir: Path | None = None, command: str | None = None,
                 records: list[dict] | None = None, version: str | None = None) -> dict[str, Path]:
    """Aggregate the records under ``source`` into ``out_dir`` (default: ``source`` if a folder): the table of one
    code version, ``version`` or by default the current code's (``table.choose_version``).

    Returns the written paths: ``csv``, ``md``, ``ratio_plot``, ``speed_plot``.
    """
    source = Path(source)
    out = Path(out_dir) if out_dir else (source if source.is_dir() else source.parent)
    records = load(source) if records is None else records
    table = rows(records, version)
    if command is None and (out / SWEEP_FILE).is_file():
        command = json.loads((out / SWEEP_FILE).read_text()).get("command")
    paths = {"csv": out / "summary.csv", "md": out / "summary.md", "ratio_plot": out / RATIO_PLOT,
             "speed_plot": out / SPEED_PLOT}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, paths["csv"])
    ratio_plot(table, paths["ratio_plot"])
    speed_plot(table, paths["speed_plot"])
    atomic_text(paths["md"], markdown(table, str(source), command, [RATIO_PLOT, SPEED_PLOT],
                                       getattr(records, "corrupt", ())))
    return paths
