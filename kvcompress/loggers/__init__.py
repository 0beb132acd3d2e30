"""Experiment loggers (``logger=<name>``): a logger is any class with ``log_run`` and ``log_sweep``.

``conf/logger/<name>.yaml`` gives its ``_target_`` and settings; a config without ``_target_``
(``logger=none``) logs nothing. Logging never fails a run: errors become one warning line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig


class Logger(Protocol):
    def log_run(self, cfg: DictConfig, record: dict, run_dir: Path) -> None: ...

    def log_sweep(self, cfg: DictConfig, paths: dict[str, Path]) -> None: ...


def make_logger(cfg: DictConfig) -> Logger | None:
    conf = cfg.get("logger")
    if conf is None or "_target_" not in conf:
        return None
    from hydra.utils import instantiate

    return instantiate(conf, _convert_="all")


def _safely(what: str, cfg: DictConfig, call: str, *args: Any) -> None:
    try:
        logger = make_logger(cfg)
        if logger is not None:
            getattr(logger, call)(cfg, *args)
    except Exception as e:  # never let logging take a run or a sweep down
        print(f"kvc: warning: logger could not log the {what}: {type(e).__name__}: {e}", file=sys.stderr)


def log_run(cfg: DictConfig, record: dict, run_dir: Path) -> None:
    """Log one finished run (config, metrics, record) with the configured logger."""
    _safely("run", cfg, "log_run", record, Path(run_dir))


def log_sweep(cfg: DictConfig, paths: dict[str, Path]) -> None:
    """Log a finished sweep's summary table and plots with the configured logger."""
    _safely("sweep summary", cfg, "log_sweep", paths)
