"""Issue 26, trustworthy numbers: records keyed by their data, tables of one code version, loud warnings, the
friction a new user meets (CLI batch size, refusals before load, throughput defaults, exit status, skips)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STORIES

from kvcompress.eval.stats import interval_metrics, mean_ci, ratio_ci, stratified_mean_ci
from kvcompress.records import config_hash, data_fingerprint, host
from kvcompress.report.cli import main as kvc_report
from kvcompress.report.markdown import markdown
from kvcompress.report.table import rows
from kvcompress.run import no_eviction_warning, per_row_and_token, summary_line

FAST = ["model=stories260k", "eval.dataset=tinystories", "eval.window=64", "eval.max_windows=2", "progress=false"]


def kvc(tmp: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvcompress.run", *args, f"results_dir={tmp}/results", f"hydra.run.dir={tmp}/run",
           f"hydra.sweep.dir={tmp}/sweep"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def records(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "results" / "records.jsonl").read_text().splitlines()]


def rec(cache: str, ppl: float, version: str = "v1", **extra) -> dict:
    return {"status": "ok", "model": "m", "eval": "ppl", "cache": cache, "config_hash": cache, "code_version": version,
            "error": None, "metrics": {"ppl": ppl, "compression_ratio": 1.0 if cache == "full" else 4.0}, **extra}


# -- item 1: a policy that never evicted says so ----------------------------------------------------------------
def test_a_policy_that_evicted_nothing_is_flagged_loudly():
    r = {**rec("snapkv", 9.6), "policy": "snapkv", "policy_params": {"budget": 0.25, "when": "prefill"}}
    r["metrics"].update(evictions=0, tokens_held_max=128)
    warning = no_eviction_warning(r)
    assert "evicted nothing" in warning and "policy.when=prefill" in warning and "full cache" in warning
    for budget, evictions, quiet in ((0.25, 3, True), (1.0, 0, True), (256, 0, True), (64, 0, False)):
        r2 = {**r, "policy_params": {"budget": budget}, "metrics": {**r["metrics"], "evictions": evictions}}
        assert (no_eviction_warning(r2) is None) == quiet, (budget, evictions)
    assert no_eviction_warning({**r, "policy": "none"}) is None
    r["warnings"] = [warning]
    assert "WARNING: policy=snapkv evicted nothing" in summary_line({**r, "duration_s": 1.0})
    table = rows([rec("full", 9.6), r], current="v1")
    flagged = next(x for x in table if x["cache"] == "snapkv")
    assert flagged["warning"] == warning and not flagged["pareto"]  # never a clean point on the front
    md = markdown(table)
    assert "⚠ 1 row(s) carry a warning" in md and "evicted nothing" in md


# -- item 2: resume keyed by the data's content --------------------------------------------------------------------
def test_the_data_is_part_of_the_config(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("one story")
    resolved = {"paths": {"data": str(tmp_path / "a")}, "eval": {"dataset": str(text)},
                "calibration": {"dataset": "tinystories"}}
    before = data_fingerprint(resolved)
    text.write_text("another story")
    edited = data_fingerprint(resolved)
    assert before["eval.dataset"] != edited["eval.dataset"]
    assert config_hash(resolved, before) != config_hash(resolved, edited)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("a")
    (tmp_path / "b" / "x.txt").write_text("b")
    lm_eval = lambda d: data_fingerprint({"paths": {"data": str(tmp_path / d)}, "eval": {"tasks": ["t"]}})
    assert lm_eval("a") != lm_eval("b")  # no text named: the data folder, by content


def test_resume_reruns_after_the_text_changed(tmp_path):
    text = tmp_path / "story.txt"
    source = STORIES.parents[2] / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.first100.txt"
    text.write_text(source.read_text()[:20000])
    sweep = ["-m", *FAST, f"eval.dataset={text}", "eval.bootstrap=0"]
    assert kvc(tmp_path, *sweep).returncode == 0
    text.write_text(text.read_text()[::-1])  # the same characters, another text
    version = records(tmp_path)[0]["code_version"]  # skipping stays allowed by the code: only the data differs
    out = kvc(tmp_path, *sweep, f"resume_compatible=[{version}]")
    assert out.returncode == 0 and "[skipped]" not in out.stdout
    first, second = records(tmp_path)
    assert first["data"] != second["data"] and first["config_hash"] != second["config_hash"]
    assert first["metrics"]["ppl"] != second["metrics"]["ppl"]
    assert set(first["host"]) >= {"cpu", "isa", "threads"}  # item 14: the processor, its vector ISA, the threads


# -- item 3: one code version per table ----------------------------------------------------------------------------
def test_a_table_is_of_one_code_version(tmp_path, capsys):
    recs = [rec("full", 10.0, "v1"), rec("int4", 11.0, "v1"), rec("int4", 60.0, "v2"), rec("h2o", 12.0, "v2")]
    table = rows(recs, current="v1")
    by_cache = {r["cache"]: r for r in table}
    assert table.version == "v1" and by_cache["int4"]["ppl"] == 11.0  # never the other version's number
    assert by_cache["h2o"]["status"] == "missing" and "v2" in by_cache["h2o"]["error"]
    md = markdown(table)
    assert "Code version: `v1` (the current code)" in md and "## Missing" in md and "`v2` (2 records)" in md
    assert rows(recs, "v2", current="v1").version == "v2"
    assert rows(recs, current="v9").version == "v2"  # no record of the current code: the newest records'
    with pytest.raises(ValueError, match="v1, v2"):
        rows(recs, "v7")
    for r in recs:
        with (tmp_path / "records.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
    assert kvc_report([str(tmp_path), "--code-version", "v2"]) == 0
    out = capsys.readouterr().out
    assert "code version v2 (asked for)" in out and "1 missing" in out
    summary = (tmp_path / "summary.md").read_text()
    assert "Code version: `v2` (asked for)" in summary and "60.000" in summary and "11.000" not in summary
    assert kvc_report([str(tmp_path)]) == 0  # by default: the current code's, else the newest records' (v2 here)
    assert "Code version: `v2` (the newest records'" in (tmp_path / "summary.md").read_text()


# -- item 4: the lm-eval CLI entry point with a batch size in model args ---------------------------------------
def test_kvc_lm_eval_cli_takes_batch_size_in_model_args(tmp_path):
    from kvcompress.harness import __main__ as cli

    assert "cache=" not in cli.__doc__  # the example composes the axes
    code = ("import sys; from kvcompress.harness.__main__ import main; main(sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, "--model", "kvcompress", "--model_args",
                          "model=stories260k,batch_size=2", "--tasks", "kvc_tinystories_cloze", "--limit", "2",
                          "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kvc_tinystories_cloze" in out.stdout and "TypeError" not in out.stderr


# -- item 5: AdaKV / DuoAttention under MiniCache, refused before weights load ---------------------------------------
def test_per_head_policies_over_minicache_are_refused_before_load(tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    for policy in ("adakv", "duo_attention"):
        out = kvc(tmp_path, *FAST, "model=local", f"model.source={folder}", f"policy={policy}", "policy.budget=10000",
                  "layout=minicache", "layout.start_layer=0")
        assert out.returncode == 1
        assert f"policy={policy} layout=minicache" in out.stderr and "layout=per_layer" in out.stderr
        assert "PairSide" not in out.stderr and "weights" not in records(tmp_path)[-1]["error"]


# -- item 6: eval=throughput's defaults run on a CPU and on the test model -------------------------------------------
def test_throughput_defaults_run_on_cpu_and_stories(stories):
    from kvcompress.cache import FullCache
    from kvcompress.eval.base import EvalContext
    from kvcompress.eval.data import default_data_dir
    from kvcompress.eval.throughput import Throughput

    model, tok = stories
    cache = FullCache()
    cache.setup(model.config.spec())
    ev = Throughput(dataset="tinystories", repeats=1)  # every other setting: the default
    ev.check(model.config.spec(), default_data_dir())
    m = ev.run(EvalContext(model, tok, cache, default_data_dir(), progress=False))
    spec = model.config.spec()
    assert m["context"] == min(1024, spec.max_position - ev.decode_tokens)
    assert m["kv_budget_auto"] == 1 and m["batch_size"] >= 1 and m["decode_tokens_per_s"] > 0
    assert m["kv_budget_bytes"] == ev.auto_rows * spec.fp16_bytes_per_token() * (m["context"] + ev.decode_tokens - 1)


# -- item 7: the record's short name follows the effective settings -------------------------------------------------
def test_short_name_follows_the_effective_settings():
    from kvcompress.harness.config import compose
    from kvcompress.job import cache_fields

    fields = cache_fields(compose({"storage": "int4", "storage.bits": 8}))
    assert (fields["storage"], fields["cache"]) == ("int8", "int8")
    fields = cache_fields(compose({"storage": "int4", "storage.bits": 8, "storage.group_size": 32}))
    assert fields["cache"] == "int8" and fields["storage_params"]["group_size"] == 32
    assert cache_fields(compose({"storage": "int4", "storage.group_size": 32}))["cache"] == "int4"
    assert cache_fields(compose({"storage": "kivi"}))["cache"] == "kivi"


# -- items 8, 9, 11: a sweep with a failed job exits 1; kv bytes per row; skipped jobs say so ---------------------
def test_sweep_exit_status_bytes_per_row_and_skips(tmp_path):
    sweep = ["-m", *FAST, "eval.batch_size=1,2", "eval.window=64,100000"]
    out = kvc(tmp_path, *sweep)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "2 ok, 2 failed" in out.stderr and "exit status 1" in out.stderr
    ok = [r for r in records(tmp_path) if r["status"] == "ok"]
    assert len(ok) == 2
    one, two = sorted(ok, key=lambda r: r["eval_params"]["batch_size"])
    assert two["metrics"]["kv_bytes"] == 2 * one["metrics"]["kv_bytes"]  # the whole batch's
    assert one["metrics"]["kv_bytes_per_row"] == two["metrics"]["kv_bytes_per_row"]
    assert one["metrics"]["kv_bytes_per_token"] == two["metrics"]["kv_bytes_per_token"] > 0
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "KV MB/row" in summary and "KV MB |" not in summary
    again = kvc(tmp_path, *sweep, f"resume_compatible=[{ok[0]['code_version']}]")  # others may edit the tree
    assert again.returncode == 1
    skipped = [line for line in again.stdout.splitlines() if line.startswith("[skipped]")]
    assert len(skipped) == 2 and all(f"reuses the ok record {r['config_hash']}" in again.stdout for r in ok)
    assert not any(line.startswith("[ok]") for line in again.stdout.splitlines())


def test_bytes_per_row_and_token():
    m = {"kv_bytes": 1200, "kv_bytes_fp16": 800, "kv_rows": 2}
    per_row_and_token(m, fp16_bytes_per_token=4)
    assert m["kv_bytes_per_row"] == 600 and m["kv_bytes_per_token"] == 1200 / (800 / 4)


# -- item 10: no interval from one sample ---------------------------------------------------------------------------
def test_one_sample_has_no_interval():
    assert all(math.isnan(x) for x in mean_ci([0.5]) + ratio_ci([2.0], [3.0]) + stratified_mean_ci([[1.0], [2.0]]))
    assert interval_metrics("ppl", 9.0, ratio_ci([2.0], [3.0])) == {"ppl": 9.0}
    lo, hi = mean_ci([0.0, 1.0, 1.0, 0.0])
    assert lo < hi
    old = rec("full", 9.0, metrics={"ppl": 9.0, "ppl/ci_low": 9.0, "ppl/ci_high": 9.0, "n_windows": 1})
    md = markdown(rows([old], current="v1"))
    assert "n=1" in md and "[9.000, 9.000]" not in md


# -- item 12: logger=wandb honours WANDB_DIR ----------------------------------------------------------------------
def test_wandb_writes_into_wandb_dir(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from kvcompress.loggers.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "hydra_run"
    record = {**rec("full", 9.0), "duration_s": 1.0}
    WandbLogger(system_stats=False).log_run(OmegaConf.create({"seed": 0}), record, run_dir)
    assert list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert not (run_dir / "wandb").exists()


# -- item 13: the calibrated CLA search says what it costs and shows its progress ---------------------------------
def test_cla_search_announces_its_cost():
    from kvcompress.cache.layout.similarity import measure

    class Ctx:
        key, progress, windows = "k", False, torch.zeros(2, 8, dtype=torch.long)

        def kv_samples(self):
            return [(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2), None) for _ in range(4)]

        def nll(self, cache):
            lines.append(f"nll {cache}")
            return 1.0

    lines: list[str] = []
    measure(Ctx(), lambda i: i, "base", lines.append)
    assert lines[0].startswith("[sharing] measuring what sharing costs: 4 NLL passes over 16 tokens")
    assert lines[1:5] == ["nll base", "nll 0", "nll 1", "nll 2"]


# -- item 14: the host is in every record and in the reports --------------------------------------------------------
def test_host_is_recorded_and_reported():
    h = host()
    assert h["isa"] == torch.backends.cpu.get_cpu_capability() and h["threads"] == torch.get_num_threads()
    a = {"cpu": "A", "isa": "AVX2", "threads": 2}
    b = {"cpu": "B", "isa": "AVX512", "threads": 16}
    assert "Host: A (AVX2, 2 threads)" in markdown(rows([rec("full", 9.0, host=a)], current="v1"))
    md = markdown(rows([rec("full", 9.0, host=a), rec("int4", 9.5, host=b)], current="v1"))
    assert "Rows from 2 hosts" in md
