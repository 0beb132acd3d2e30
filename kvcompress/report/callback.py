"""Hydra callback: at the end of every multirun, aggregate ``results_dir`` and log the sweep's summary."""
from __future__ import annotations

import json
import shutil
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kvcompress.loggers import log_sweep
from kvcompress.records import RECORDS_FILE, write_json_atomic
from kvcompress.report import SWEEP_FILE, build_report
from kvcompress.report.jobs import unpublished


def overrides(config: DictConfig) -> list[str]:
    return list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])


def sweep_command(config: DictConfig) -> str:
    return " ".join(["kvc", "-m", *overrides(config)])


def failed_since(results: Path, before: tuple[int, int] | None) -> int:
    """Failed records appended to ``results/records.jsonl`` after it had ``before[0]`` bytes (by any process)."""
    path = results / RECORDS_FILE
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        f.seek(before[0] if before else 0)
        tail = f.read().decode("utf-8", errors="replace")
    count = 0
    for line in tail.splitlines():
        try:
            count += json.loads(line).get("status") == "failed"
        except (json.JSONDecodeError, AttributeError):
            continue
    return count


def records_state(results: Path) -> tuple[int, int] | None:
    """(size, mtime) of ``results/records.jsonl``: unchanged after a sweep means no job wrote a record."""
    path = results / RECORDS_FILE
    if not path.is_file():
        return None
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class SweepReport(Callback):
    """Writes summary.csv, summary.md and the plots into ``results_dir`` when a multirun ends.

    A sweep that added no record (every job skipped) keeps the recorded command (sweep.json); a committed
    results_dir that the sweep may not write to (no ``publish=true``) is left untouched. ``failed``: the failed
    records the last multirun added (``kvc`` exits 1 when any), whichever launcher ran the jobs.
    """

    failed = 0

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.before: tuple[int, int] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.before = records_state(Path(str(config.results_dir)))
        if self.enabled and (why := unpublished(config, overrides(config))):
            print(f"kvc: warning: {why}; jobs that are not skipped will fail", file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        SweepReport.failed = failed_since(Path(str(config.results_dir)), self.before)
        if not self.enabled:
            return
        try:
            results = Path(str(config.results_dir))
            if not results.exists():
                print(f"kvc: no records in {results}; no sweep summary", file=sys.stderr)
                return
            if why := unpublished(config, overrides(config)):
                print(f"kvc: sweep summary not rebuilt: {why}", file=sys.stderr)
                return
            command = sweep_command(config)
            if records_state(results) != self.before or not (results / SWEEP_FILE).is_file():
                write_json_atomic(results / SWEEP_FILE, {
                    "command": command, "sweep_dir": str(OmegaConf.select(config, "hydra.sweep.dir")),
                    "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            else:  # every job skipped: the records still come from the recorded command
                command = None
                print(f"kvc: no new records; {results / SWEEP_FILE} (the command that made them) kept", flush=True)
            optuna = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))) / "optimization_results.yaml"
            if optuna.is_file():  # Optuna's own Pareto front (multi-objective) or best trial, beside the summary
                shutil.copyfile(optuna, results / "optuna_results.yaml")
            paths = build_report(results, command=command)
            print(f"kvc: sweep summary -> {paths['md']} ({paths['ratio_plot'].name}, {paths['speed_plot'].name})",
                  flush=True)
        except Exception as e:  # a report failure never hides the sweep's records
            print(f"kvc: sweep summary failed: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}",
                  file=sys.stderr)
            return
        log_sweep(config, paths)
