"""Per-job hooks of ``kvc``: resume (skip finished configs of the same code), where records may go, metric
sanity, sweep objectives."""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from kvcompress.records import RECORDS_FILE, is_committed, read_records

# Metrics that may be non-finite in an ok run: (name, when). Every other non-finite metric fails the run.
NONFINITE_OK = {
    "compression_ratio": "NaN when the cache holds no bytes (kv_bytes == 0)",
}
NONFINITE_OK_SUFFIXES = ("_stderr",)  # lm-eval reports NaN standard errors for tiny samples


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under Hydra
        return False


def command_line_overrides() -> list[str]:
    """The overrides typed on the command line ([] outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def same_code(record: dict, code_version: str | None, compatible=()) -> bool:
    """A record counts as this code's result when its code version is ours or one declared compatible."""
    got = record.get("code_version")
    return got is not None and (got == code_version or got in set(compatible or ()))


def finished_record(results_dir: Path, config_hash: str, code_version: str | None = None,
                    compatible=()) -> dict | None:
    """The last ok record with this config hash and code version in ``results_dir/records.jsonl``, if any."""
    path = Path(results_dir) / RECORDS_FILE
    if not path.is_file():
        return None
    for r in reversed(read_records(path)):
        if r.get("config_hash") == config_hash and r.get("status") == "ok" and same_code(r, code_version, compatible):
            return r
    return None


def resume(cfg: DictConfig, record: dict) -> dict | None:
    """In a multirun, the finished record of this job's config made by the same code version (or one listed in
    ``resume_compatible``), so the job is skipped, unless ``force``. Single runs always run."""
    if cfg.get("force", False) or not in_multirun():
        return None
    compatible = list(cfg.get("resume_compatible") or [])
    done = finished_record(Path(cfg.results_dir), record["config_hash"], record.get("code_version"), compatible)
    if done is not None:
        print(f"kvc: skip: ok record {record['config_hash']} of code version {done['code_version']} exists in "
              f"{cfg.results_dir} (force=true re-runs it)", flush=True)
    return done


def named_on_command_line(key: str, overrides: list[str]) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def unpublished(cfg: DictConfig, overrides: list[str] | None = None) -> str | None:
    """Why this run may not add records to ``results_dir`` (None when it may).

    A results folder that git tracks holds published results: a run adds to it only with ``publish=true`` or when
    ``results_dir=`` is named on the command line (an experiment preset's default does not count).
    """
    if cfg.get("publish", False):
        return None
    overrides = command_line_overrides() if overrides is None else overrides
    results = Path(str(cfg.results_dir))
    if named_on_command_line("results_dir", overrides) or not is_committed(results):
        return None
    return (f"results_dir={results} holds committed (git-tracked) results and this run would add to them; pass "
            f"publish=true to publish into it, or results_dir=<another folder> (e.g. results/runs/{results.name})")


def nonfinite_allowed(key: str, metrics: dict) -> bool:
    if key.endswith(NONFINITE_OK_SUFFIXES):
        return True
    return key == "compression_ratio" and metrics.get("kv_bytes") == 0


def check_metrics(metrics: dict) -> None:
    """Any NaN or infinite metric is a failed run, not a result (except those in ``NONFINITE_OK``)."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)
           and not nonfinite_allowed(k, metrics)}
    if bad:
        shown = ", ".join(f"{k} is {v}" for k, v in list(bad.items())[:6])
        raise FloatingPointError(f"{shown} (non-finite metric: the strategy produced non-finite logits or scores)")


def objectives(record: dict) -> tuple[float, float] | None:
    """What ``kvc`` returns to a sweeper (Optuna): (ppl to minimise, compression ratio to maximise).

    Minimising ppl minimises Δppl, the full cache's ppl being fixed for a model and eval.
    A failed run returns None, which Optuna records as a failed trial.
    """
    m = record.get("metrics") or {}
    if record.get("status") != "ok" or "ppl" not in m or "compression_ratio" not in m:
        return None
    return float(m["ppl"]), float(m["compression_ratio"])
