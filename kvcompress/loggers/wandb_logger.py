"""Weights & Biases logger: one W&B run per kvc run, one summary run per sweep.

Offline by default; ``mode=online`` needs an API key (``WANDB_API_KEY`` or ``wandb login``) and
falls back to offline without one or when the server cannot be reached. Offline runs are real
run folders under ``<run dir>/wandb/``; upload them later with ``wandb sync <folder>``.
"""
from __future__ import annotations

import netrc
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kvcompress.records import record_settings

MODES = ("offline", "online", "disabled")
_UNREACHABLE: list[str] = []  # set once an online init failed: later runs of this process go offline at once
AXES = ("storage", "policy", "layout")
IDENTITY = {"storage": "dense", "policy": "none", "layout": "per_layer"}


def axis_tags(record: dict) -> list[str]:
    """``storage:kivi``, ``policy:h2o``, ``layout:cla`` for the axes a run changes (identity axes untagged);
    ``cache:<name>`` for a whole-interface cache (``cache=`` escape hatch, or an old record without axes);
    ``baseline`` for the full cache."""
    axes = {axis: record.get(axis) for axis in AXES if record.get(axis)}
    if not axes:
        return ["baseline"] if record.get("cache") == "full" else [f"cache:{record.get('cache')}"]
    tags = [f"{axis}:{name}" for axis, name in axes.items() if name != IDENTITY[axis]]
    return tags or ["baseline"]


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def hydra_node(cfg: DictConfig):
    """The Hydra config: inside the sweep callback it is ``cfg.hydra``; inside a job, HydraConfig."""
    if "hydra" in cfg:
        return cfg.hydra
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:
        return None


def sweep_name(cfg: DictConfig) -> str | None:
    """The experiment preset's name, else the sweep folder (``2026-01-31_12-00-00``) in a multirun."""
    hc = hydra_node(cfg)
    if hc is None:
        return None
    exp = OmegaConf.select(hc, "runtime.choices.experiment")
    if exp:
        return str(exp)
    if str(OmegaConf.select(hc, "mode")) == "RunMode.MULTIRUN" or OmegaConf.select(hc, "job.num") is not None:
        return "_".join(Path(str(hc.sweep.dir)).parts[-2:])
    return None


@dataclass
class WandbLogger:
    name: str = "wandb"
    project: str = "kvcompress"
    entity: str | None = None
    mode: str = "offline"
    dir: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    system_stats: bool = True
    init_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"logger.mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    # -- wandb plumbing ----------------------------------------------------------------------
    def folder(self, default: Path) -> Path:
        """Where W&B writes: ``logger.dir``, else ``$WANDB_DIR`` (as wandb itself honours it), else ``default``
        (the Hydra run folder, or the sweep folder for the summary)."""
        chosen = self.dir or os.environ.get("WANDB_DIR")
        return Path(chosen).expanduser() if chosen else Path(default)

    def _mode(self) -> str:
        if self.mode == "online" and not has_api_key():
            print("kvc: W&B: no WANDB_API_KEY (or wandb login); logging offline", file=sys.stderr)
            return "offline"
        if self.mode == "online" and _UNREACHABLE:
            return "offline"
        return self.mode

    def _init(self, run_dir: Path, **kwargs):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        mode = self._mode()
        settings_ = dict(silent=True, console="off", init_timeout=self.init_timeout,
                         x_disable_stats=not self.system_stats)
        common = dict(project=self.project, entity=self.entity, dir=str(run_dir), reinit="finish_previous", **kwargs)
        try:
            return wandb.init(mode=mode, settings=wandb.Settings(**settings_), **common)
        except Exception as e:
            if mode != "online":
                raise
            print(f"kvc: W&B: online init failed ({type(e).__name__}: {e}); logging offline", file=sys.stderr)
            _UNREACHABLE.append(str(e))
            return wandb.init(mode="offline", settings=wandb.Settings(**settings_), **common)

    @staticmethod
    def _finish(run) -> None:
        run.finish()
        if run.settings.mode == "offline":
            print(f"kvc: W&B offline run in {Path(run.dir).parent} (upload: wandb sync {Path(run.dir).parent})",
                  flush=True)

    # -- the logger protocol ---------------------------------------------------------------
    def log_run(self, cfg: DictConfig, record: dict, run_dir: Path) -> None:
        import json

        tags = [record["model"], str(record["eval"]), str(record["cache"]), *axis_tags(record), *self.tags]
        config = OmegaConf.to_container(cfg, resolve=True)
        config["kvc"] = {k: record.get(k) for k in ("cache", *AXES, "eval", "config_hash", "code_version", "git_sha")}
        short = record_settings(record)
        name = f"{record['cache']} {short}".strip()[:100] + f" | {record['eval']}"
        run = self._init(self.folder(run_dir), config=config,
                         group=self.group or sweep_name(cfg), job_type=str(record["eval"]), name=name,
                         tags=sorted({t[:64] for t in tags if t}))
        try:
            numeric = {k: v for k, v in (record.get("metrics") or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numeric:
                run.log(numeric)
            run.summary.update({"status": record["status"], "error": record.get("error"),
                                "duration_s": record.get("duration_s"), "config_hash": record.get("config_hash"),
                                "code_version": record.get("code_version")})
            Path(run.dir, "record.json").write_text(json.dumps(record, indent=2, default=str))
        finally:
            self._finish(run)

    def log_sweep(self, cfg: DictConfig, paths: dict[str, Path]) -> None:
        import pandas as pd
        import wandb

        group = self.group or sweep_name(cfg) or "sweep"
        where = self.folder(Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))))
        run = self._init(where, group=group, job_type="sweep-summary", name=f"{group} summary", tags=["summary"])
        try:
            table = pd.read_csv(paths["csv"]).astype(object).where(lambda d: d.notna(), None)
            run.log({"summary": wandb.Table(dataframe=table),
                     **{k: wandb.Image(str(paths[k])) for k in ("ratio_plot", "speed_plot")}})
            art = wandb.Artifact(re.sub(r"[^\w.-]", "_", f"{group}-report"), type="sweep-report")
            for p in paths.values():
                art.add_file(str(p))
            run.log_artifact(art)
        finally:
            self._finish(run)
