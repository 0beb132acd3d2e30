"""``kvc``: one run = one model x one cache (storage x policy x layout) x one evaluation -> one record.

    kvc model=smollm2-135m storage=kivi policy=h2o policy.budget=256 layout=per_layer eval=ppl
    kvc -m storage=dense,int4 policy=none,h2o eval=ppl      # a Hydra sweep: the Cartesian product
"""
from __future__ import annotations

import math
import resource
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvcompress.eval.base import EvalContext
from kvcompress.eval.data import default_data_dir, default_shared_dir
from kvcompress.job import cache_fields
from kvcompress.loggers import log_run
from kvcompress.records import (
    RECORDS_FILE,
    append_jsonl,
    config_hash,
    data_fingerprint,
    git_sha,
    host,
    running_code_version,
    versions,
    write_json_atomic,
)
from kvcompress.report.jobs import check_metrics, objectives, resume, unpublished

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
OmegaConf.register_new_resolver("kvc_shared", lambda: str(default_shared_dir()), replace=True)
OmegaConf.register_new_resolver("kvc_data", lambda: str(default_data_dir()), replace=True)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _choice(group: str) -> str:
    try:
        return HydraConfig.get().runtime.choices.get(group) or "?"
    except ValueError:  # not under Hydra (tests calling execute directly)
        return "?"


def new_record(cfg: DictConfig) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    params = lambda d: {k: v for k, v in (d or {}).items() if k != "_target_"}
    data = data_fingerprint(resolved)
    return {
        "status": "running", "error": None,
        "model": cfg.model.name, **cache_fields(cfg), "eval": _choice("eval"),
        "eval_params": params(resolved.get("eval")), "seed": cfg.seed, "device": None, "dtype": cfg.dtype,
        "metrics": {}, "versions": versions(), "git_sha": git_sha(),
        "code_version": running_code_version(), "config_hash": config_hash(resolved, data), "data": data,
        "host": host(),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "duration_s": None,
    }


def evaluate(cfg: DictConfig, record: dict) -> dict:
    """Validate everything, load the model, calibrate the cache if it wants, run the evaluation."""
    from kvcompress.job import prepare

    evaluation = instantiate(cfg.eval, _convert_="all")
    run = prepare(cfg, evaluation.check, evaluation.check_cache)
    record["device"] = str(run.device)
    count_rows(run.cache)
    ctx = EvalContext(run.model, run.tokenizer, run.cache, run.data_dir, cfg.seed, cfg.progress)
    metrics = evaluation.run(ctx)
    metrics["peak_memory_bytes"] = peak_memory_bytes(run.device)
    per_row_and_token(metrics, run.cache.spec.fp16_bytes_per_token())
    return metrics


def count_rows(cache) -> None:
    """The cache's memory reports also say how many batch rows they count (``kv_rows``): ``kv_bytes`` is the
    whole batch's, so a table that compares caches needs it per row."""
    report = cache.memory_report

    def with_rows() -> dict:
        rows = getattr(cache, "batch_size", None)
        return {**report(), **({"kv_rows": rows} if isinstance(rows, int) and rows > 0 else {})}
    cache.memory_report = with_rows


def per_row_and_token(metrics: dict, fp16_bytes_per_token: int) -> None:
    """``kv_bytes_per_row`` = kv_bytes / rows (the report's ``kv_rows``, else the eval's ``batch_size``: a static
    decode form reports for itself); ``kv_bytes_per_token`` = kv_bytes / tokens seen, the tokens seen being
    ``kv_bytes_fp16 / fp16_bytes_per_token``: both independent of ``eval.batch_size``."""
    held, rows = metrics.get("kv_bytes"), metrics.get("kv_rows", metrics.get("batch_size"))
    if not isinstance(held, (int, float)):
        return
    if isinstance(rows, int) and rows > 0:
        metrics["kv_rows"] = rows
        metrics["kv_bytes_per_row"] = held / rows
    tokens = (metrics.get("kv_bytes_fp16") or 0) / fp16_bytes_per_token
    if tokens > 0:
        metrics["kv_bytes_per_token"] = held / tokens


def no_eviction_warning(record: dict) -> str | None:
    """A policy with a budget below the tokens a store held that evicted nothing measured the full cache under
    its own name (e.g. ``policy.when=prefill`` where the evaluation never ends a prompt): say so, loudly."""
    m, params = record.get("metrics") or {}, record.get("policy_params") or {}
    budget, held = params.get("budget"), m.get("tokens_held_max")
    if record.get("policy") in (None, "none") or m.get("evictions") != 0 or not isinstance(held, (int, float)):
        return None
    if not isinstance(budget, (int, float)) or isinstance(budget, bool):
        return None
    limit = math.ceil(budget * held) if isinstance(budget, float) else budget
    if limit >= held:
        return None
    when = params.get("when")
    why = f" (policy.when={when}: this evaluation never ended a prompt)" if when in ("prefill", "both") else ""
    return (f"policy={record['policy']} evicted nothing although policy.budget={budget} is below the "
            f"{held:g} tokens a store held{why}: this number is the full cache's, not {record['cache']}'s")


def summary_line(r: dict, results: str | None = None) -> str:
    """One line per job; a skipped job says which record it reuses (not that record's duration as its own)."""
    m = r["metrics"]
    parts = [f"[{'skipped' if r.get('reused') else r['status']}] {r['model']} cache={r['cache']} eval={r['eval']}"]
    for key, fmt in (("ppl", "ppl={:.3f}"), ("compression_ratio", "ratio={:.2f}x"),
                     ("kv_bytes_per_row", "kv/row={:.3f}MB"), ("decode_tokens_per_s", "decode={:.1f}tok/s")):
        if isinstance(m.get(key), (int, float)):
            parts.append(fmt.format(m[key] / 1e6 if key == "kv_bytes_per_row" else m[key]))
    if r.get("reused"):
        where = f" in {Path(results) / RECORDS_FILE}" if results else ""
        parts.append(f"reuses the ok record {r['config_hash']} of {r.get('started_at')} (code version "
                     f"{r.get('code_version')}){where}")
    else:
        parts.append(f"{r['duration_s']:.1f}s")
    if r["error"]:
        parts.append(f"error: {r['error']}")
    parts += [f"WARNING: {w}" for w in r.get("warnings") or []]
    return "  ".join(parts)


def print_table(r: dict) -> None:
    rows = [("model", r["model"]), ("cache", f"{r['cache']} {r['cache_params'] or ''}".strip()),
            ("eval", r["eval"]), ("status", r["status"])]
    rows += [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in r["metrics"].items()]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def execute(cfg: DictConfig, run_dir: Path) -> dict:
    """Run one job and write its record, whatever happens. Returns the record."""
    record = new_record(cfg)
    if (done := resume(cfg, record)) is not None:  # multirun: an ok record of this config exists (force=true)
        return {**done, "reused": True}  # never written: the record reused stays as it is
    t0 = time.perf_counter()
    refused = unpublished(cfg)  # committed results are added to only on request (publish=true)
    try:
        if refused:
            raise PermissionError(refused)
        record["metrics"] = evaluate(cfg, record)
        check_metrics(record["metrics"])  # any NaN/inf metric fails the run
        record["status"] = "ok"
        if warning := no_eviction_warning(record):
            record["warnings"] = [warning]
    except Exception as e:  # a failed job is recorded, never lost
        record["status"], record["error"] = "failed", f"{type(e).__name__}: {e}"
        record["traceback"] = traceback.format_exc(limit=8)
    record["duration_s"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(run_dir / "record.json", record)
    if not refused:
        append_jsonl(Path(cfg.results_dir) / RECORDS_FILE, record)
    log_run(cfg, record, run_dir)  # logger=wandb: config, metrics, record; logger=none: nothing
    return record


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> tuple[float, float] | None:
    hc = HydraConfig.get()
    record = execute(cfg, Path(hc.runtime.output_dir))
    OUTCOMES.append("skipped" if record.get("reused") else record["status"])
    print(summary_line(record, str(cfg.results_dir)), flush=True)
    if hc.mode == RunMode.RUN:
        print_table(record)
        if record["status"] != "ok":
            print(f"kvc: error: {record['error']}", file=sys.stderr)
            sys.exit(1)
    return objectives(record)  # (ppl, compression ratio) for sweepers that optimise (Optuna)



def shared_axis_settings(argv: list[str]) -> list[str]:
    """``kvc -m policy=h2o,snapkv policy.budget=0.25``: Hydra composes a multirun's primary config with the
    default choice of a swept group (``policy=none``), which has no ``budget``, and aborts the whole sweep. A
    setting of a swept axis is passed as ``++`` (add or override), so the sweep runs; a job whose choice has no
    such setting fails alone, recorded, with the class's own error (``policy=none`` ignores them)."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return argv
    swept = {a.split("=", 1)[0] for a in argv if "=" in a and "," in a.split("=", 1)[1]}
    swept &= {"storage", "policy", "layout"}

    def shared(a: str) -> bool:
        key = a.split("=", 1)[0]
        return "=" in a and "." in key and key.split(".", 1)[0] in swept
    return [f"++{a}" if shared(a) else a for a in argv]


OUTCOMES: list[str] = []  # per job of this process: ok | failed | skipped


def sweep_status(outcomes: list[str], failed_records: int) -> int:
    """A multirun's exit status: 1 when any job failed (counted here, or as failed records a launcher's other
    processes added: ``SweepReport.failed``), with a line that says how many; else 0."""
    failed = max(outcomes.count("failed"), failed_records)
    if not outcomes and not failed:  # no job ran here (--cfg, --help) or another launcher's jobs all passed
        return 0
    counts = {k: outcomes.count(k) for k in ("ok", "failed", "skipped")} if outcomes else {}
    shown = ", ".join(f"{n} {k}" for k, n in counts.items()) or f"{failed} failed record(s)"
    print(f"kvc: sweep: {shown}" + (f"; exit status 1 ({failed} job(s) failed)" if failed else ""),
          file=sys.stderr if failed else sys.stdout, flush=True)
    return 1 if failed else 0


def main() -> None:
    sys.argv = shared_axis_settings(sys.argv)
    hydra_main()
    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        from kvcompress.report.callback import SweepReport

        sys.exit(sweep_status(OUTCOMES, SweepReport.failed))


if __name__ == "__main__":
    main()
