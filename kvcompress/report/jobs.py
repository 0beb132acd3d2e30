"""Per-job hooks of ``kvc``: resume (skip finished configs), metric sanity, sweep objectives."""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from kvcompress.records import RECORDS_FILE, read_records


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under Hydra
        return False


def finished_record(results_dir: Path, config_hash: str) -> dict | None:
    """The last ok record with this config hash in ``results_dir/records.jsonl``, if any."""
    path = Path(results_dir) / RECORDS_FILE
    if not path.is_file():
        return None
    for r in reversed(read_records(path)):
        if r.get("config_hash") == config_hash and r.get("status") == "ok":
            return r
    return None


def resume(cfg: DictConfig, record: dict) -> dict | None:
    """In a multirun, the finished record of this job's config (so the job is skipped) unless ``force``.

    Single runs always run: they are an explicit request.
    """
    if cfg.get("force", False) or not in_multirun():
        return None
    done = finished_record(Path(cfg.results_dir), record["config_hash"])
    if done is not None:
        print(f"kvc: skip: ok record {record['config_hash']} exists in {cfg.results_dir} (force=true re-runs it)",
              flush=True)
    return done


def check_metrics(metrics: dict) -> None:
    """A NaN or infinite perplexity is a failed run, not a result."""
    for key in ("ppl", "nll"):
        v = metrics.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"{key} is {v} (the strategy produced non-finite logits or scores)")


def objectives(record: dict) -> tuple[float, float] | None:
    """What ``kvc`` returns to a sweeper (Optuna): (ppl to minimise, compression ratio to maximise).

    Minimising ppl minimises Δppl, the full cache's ppl being fixed for a model and eval.
    A failed run returns None, which Optuna records as a failed trial.
    """
    m = record.get("metrics") or {}
    if record.get("status") != "ok" or "ppl" not in m or "compression_ratio" not in m:
        return None
    return float(m["ppl"]), float(m["compression_ratio"])
