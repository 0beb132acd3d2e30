"""Hydra callback: at the end of every multirun, aggregate ``results_dir`` and log the sweep's summary."""
from __future__ import annotations

import shutil
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kvcompress.records import write_json_atomic
from kvcompress.report import SWEEP_FILE, build_report


def sweep_command(config: DictConfig) -> str:
    overrides = OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
    return " ".join(["kvc", "-m", *overrides])


class SweepReport(Callback):
    """Writes summary.csv, summary.md and the plots into ``results_dir`` when a multirun ends."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            results = Path(str(config.results_dir))
            if not results.exists():
                print(f"kvc: no records in {results}; no sweep summary", file=sys.stderr)
                return
            command = sweep_command(config)
            write_json_atomic(results / SWEEP_FILE, {
                "command": command, "sweep_dir": str(OmegaConf.select(config, "hydra.sweep.dir")),
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
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
        from kvcompress.loggers import log_sweep

        log_sweep(config, paths)
