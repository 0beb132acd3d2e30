"""Sweeps on stories260K: records, summary + plots, failure isolation, resume, W&B offline files, submitit."""
import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, PNG, STORIES, kvc, records

from kvcompress.report import build_report, pareto_front, rows
from kvcompress.report.cli import main as kvc_report
from kvcompress.report.jobs import check_metrics, objectives

POLICIES = {  # test-only policy presets, added to Hydra's search path
    "stream16": "_target_: kvcompress.cache.policy.streaming.StreamingLLM\nbudget: 16\nsinks: 4\n",
    "bad": "_target_: kvcompress.cache.policy.streaming.StreamingLLM\nbudget: 16\nsinks: 32\n",  # sinks >= budget
}


def kvc_m(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    conf = tmp / "conf" / "policy"
    conf.mkdir(parents=True, exist_ok=True)
    for name, text in POLICIES.items():
        (conf / f"{name}.yaml").write_text(text)
    cmd = [sys.executable, "-m", "kvcompress.run", "-m", *FAST, f"hydra.searchpath=[file://{tmp / 'conf'}]",
           f"results_dir={tmp}/results", f"hydra.sweep.dir={tmp}/sweep", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env | {"WANDB_SILENT": "true"})


def wandb_records(run_file: Path) -> list:
    """Protobuf records of an offline W&B run file (LevelDB-style log: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


def items(recs: list, kind: str) -> dict:
    """key -> decoded value of every config / history / summary item of that kind."""
    out = {}
    for r in recs:
        if r.WhichOneof("record_type") == kind:
            for it in getattr(r, kind).update if kind != "history" else r.history.item:
                key = it.key or "/".join(it.nested_key)
                out[key] = json.loads(it.value_json)
    return out


def offline_runs(folder: Path) -> list[Path]:
    return sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))


def test_sweep_summary_failures_wandb_resume_force(tmp_path):
    out = kvc_m(tmp_path, "policy=none,stream16,bad", "logger=wandb")
    assert out.returncode == 1, out.stderr[-3000:]  # a job failed: the sweep says so in its exit status
    assert "kvc: sweep: 2 ok, 1 failed, 0 skipped; exit status 1" in out.stderr
    recs = records(tmp_path)
    assert [(r["cache"], r["status"]) for r in recs] == [("full", "ok"), ("stream16", "ok"), ("bad", "failed")]
    assert "sinks must be < budget" in recs[2]["error"]
    assert len({r["config_hash"] for r in recs}) == 3
    # one concise line per finished run
    assert out.stdout.count("[ok] stories260k") == 2 and out.stdout.count("[failed] stories260k cache=bad") == 1

    res = tmp_path / "results"
    table = {r["cache"]: r for r in csv.DictReader((res / "summary.csv").open())}
    assert set(table) == {"full", "stream16", "bad"}
    assert float(table["full"]["delta_ppl"]) == 0
    ok = {r["cache"]: r for r in recs if r["status"] == "ok"}
    assert float(table["stream16"]["delta_ppl"]) == pytest.approx(ok["stream16"]["metrics"]["ppl"]
                                                                  - ok["full"]["metrics"]["ppl"])
    assert ok["stream16"]["metrics"]["compression_ratio"] > ok["full"]["metrics"]["compression_ratio"]
    assert table["bad"]["status"] == "failed" and "sinks must be < budget" in table["bad"]["error"]
    md = (res / "summary.md").read_text()
    failed_part = md.split("## Failed runs")[1]
    assert "| bad |" in failed_part and "sinks must be < budget" in failed_part
    assert md.index("| full |") < md.index("| stream16 |") < md.index("## Failed runs")
    for png in ("ratio_vs_dppl.png", "speed_vs_dppl.png"):
        assert (res / png).read_bytes()[:8] == PNG

    # W&B offline: one run per job (config, metrics, record), group = sweep, tags; one summary run
    runs = offline_runs(tmp_path / "sweep" / "0")
    assert len(runs) == 1
    wr = wandb_records(runs[0])
    run = next(r.run for r in wr if r.WhichOneof("record_type") == "run")
    assert run.run_group == f"{tmp_path.name}_sweep"  # the multirun folder when no experiment preset
    assert {"stories260k", "baseline", "ppl", "full"} <= set(run.tags)
    config = {it.key: json.loads(it.value_json) for it in run.config.update}
    assert config["model"]["name"] == "stories260k" and config["kvc"]["config_hash"] == recs[0]["config_hash"]
    assert items(wr, "history")["ppl"] == pytest.approx(recs[0]["metrics"]["ppl"])
    assert items(wr, "summary")["status"] == "ok"
    assert json.loads((runs[0].parent / "files" / "record.json").read_text()) == recs[0]
    failed_run = wandb_records(offline_runs(tmp_path / "sweep" / "2")[0])
    assert "sinks must be < budget" in items(failed_run, "summary")["error"]
    summary_run = wandb_records(offline_runs(tmp_path / "sweep")[0])
    logged = items(summary_run, "history")
    assert (logged["summary/_type"], logged["summary/nrows"]) == ("table-file", 3)
    assert logged["ratio_plot/_type"] == logged["speed_plot/_type"] == "image-file"
    assert any(r.WhichOneof("record_type") == "artifact" for r in summary_run)

    # re-run: ok jobs are skipped, the failed one runs again; logger=none logs nothing
    out = kvc_m(tmp_path, "policy=none,stream16,bad", "logger=none")
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stdout.count("kvc: skip") == 2
    assert [(r["cache"], r["status"]) for r in records(tmp_path)[3:]] == [("bad", "failed")]
    assert len(list((tmp_path / "sweep").rglob("offline-run-*"))) == 4
    # force=true runs a finished job again
    out = kvc_m(tmp_path, "policy=stream16", "force=true")
    assert out.returncode == 0 and "kvc: skip" not in out.stdout
    assert [(r["cache"], r["status"]) for r in records(tmp_path)[4:]] == [("stream16", "ok")]


def test_submitit_local_two_job_sweep(tmp_path):
    out = kvc_m(tmp_path, "hydra/launcher=submitit_local", "policy=none,stream16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted((r["cache"], r["status"]) for r in records(tmp_path)) == [("full", "ok"), ("stream16", "ok")]
    assert len(list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))) == 2
    assert (tmp_path / "results" / "summary.md").is_file()


def test_pareto_front_on_hand_made_points():
    # (compression ratio: max, dppl: min)
    pts = [(1.0, 0.0), (2.0, 0.1), (2.0, 0.3), (4.0, 0.5), (3.0, 0.6), (4.0, 0.5), (8.0, 5.0), (0.5, 0.0),
           (float("nan"), -1.0), (9.0, float("inf"))]
    assert pareto_front(pts, maximize=(True, False)) == [0, 1, 3, 5, 6]
    assert pareto_front([(1, 1), (2, 2), (0, 3)], maximize=(False, False)) == [0, 2]
    assert pareto_front([(1, 1, 1), (1, 1, 2), (2, 0, 0)], maximize=(True, True, True)) == [1, 2]
    assert pareto_front([], maximize=(True, False)) == []
    with pytest.raises(ValueError, match="coordinates"):
        pareto_front([(1, 2, 3)], maximize=(True, False))


def record(cache: str, ppl: float | None, ratio: float, status: str = "ok", window: int = 64, **extra) -> dict:
    metrics = {} if ppl is None else {"ppl": ppl, "compression_ratio": ratio, "kv_bytes": 1000 / ratio}
    return {"status": status, "error": None if status == "ok" else "ValueError: budget must be >= 1",
            "model": "m", "cache": cache, "cache_params": {"budget": ratio}, "eval": "ppl",
            "eval_params": {"window": window}, "dtype": "float32", "metrics": metrics,
            "config_hash": f"{cache}-{ratio}-{window}", **extra}


def test_report_from_records(tmp_path, capsys):
    recs = [record("full", 10.0, 1.0), record("h2o", 10.5, 2.0), record("snapkv", 12.0, 1.5),
            record("h2o", None, 0.0, status="failed"), record("full", 20.0, 1.0, window=32),
            record("streaming", 22.0, 4.0, window=32), record("h2o", 11.0, 4.0, status="failed")]
    recs.append(record("h2o", 10.8, 4.0))  # same config as the failed one before: the ok record wins
    lines = [json.dumps(r) for r in recs]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + '\n{"status": "ok", "mod')  # a torn last line
    with pytest.warns(UserWarning, match="corrupt record line"):
        assert kvc_report([str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "6 ok run(s) (1 failed, 0 missing)" in said and "1 corrupt line(s)" in said  # the torn line is reported
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(table) == 7
    by = {(r["cache"], r["eval_params"], r["compression_ratio"]): r for r in table}
    h2o = by[("h2o", '{"window": 64}', "2.0")]
    assert float(h2o["delta_ppl"]) == pytest.approx(0.5) and h2o["pareto"] == "★"
    assert by[("snapkv", '{"window": 64}', "1.5")]["pareto"] == ""  # dominated by h2o 2x
    assert float(by[("streaming", '{"window": 32}', "4.0")]["delta_ppl"]) == pytest.approx(2.0)
    md = (tmp_path / "summary.md").read_text()
    assert md.count("## m float32 eval=ppl") == 2
    assert "budget must be >= 1" in md.split("## Failed runs")[1]
    group64 = md.split("window=64")[1].split("##")[0]
    assert group64.index("| full |") < group64.index("| h2o |") < group64.index("| snapkv |")
    assert all((tmp_path / p).read_bytes()[:8] == PNG for p in ("ratio_vs_dppl.png", "speed_vs_dppl.png"))
    assert kvc_report([str(tmp_path / "nothing")]) == 1
    # rows() is what the plots and the callback use
    assert len(rows(recs)) == 7
    with pytest.warns(UserWarning, match="corrupt record line"):  # said again by the library call, never hidden
        assert build_report(tmp_path / "records.jsonl", tmp_path / "again")["md"].is_file()


def test_nan_ppl_fails_and_objectives():
    with pytest.raises(FloatingPointError, match="ppl is nan"):
        check_metrics({"ppl": float("nan")})
    with pytest.raises(FloatingPointError, match="decode_tokens_per_s is nan"):
        check_metrics({"ppl": 3.0, "decode_tokens_per_s": float("nan")})  # any non-finite metric fails the run
    check_metrics({"ppl": 3.0, "kv_bytes": 0, "compression_ratio": float("nan")})  # documented: nothing held
    assert objectives(record("h2o", 10.5, 2.0)) == (10.5, 2.0)
    assert objectives(record("h2o", None, 2.0, status="failed")) is None


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kvcompress.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


def test_presets_compose():
    """compare_all's every point x bench, pareto_search (Optuna) and the submitit presets compose."""
    from omegaconf import OmegaConf

    from kvcompress.run import CONF_DIR

    cfg = compose("experiment=compare_all")
    assert cfg.results_dir == "results/compare_all"
    params = cfg.hydra.sweeper.params
    points, benches = params["+experiment/point"].split(","), params["+experiment/bench"].split(",")
    assert "full" in points and len(points) >= 8 and benches == ["ppl", "speed"]
    for point in points:
        for bench in benches:
            job = compose("experiment=compare_all", f"+experiment/point={point}", f"+experiment/bench={bench}")
            for axis in ("storage", "policy", "layout"):
                choice = job.hydra.runtime.choices[axis]
                default = OmegaConf.load(Path(CONF_DIR) / axis / f"{choice}.yaml")
                assert job[axis]._target_ == default._target_
            assert job.hydra.runtime.choices.eval == bench
    ps = compose("experiment=pareto_search")
    assert ps.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert list(ps.hydra.sweeper.direction) == ["minimize", "maximize"] and ps.hydra.sweeper.max_failure_rate == 1
    for launcher, target in (("slurm", "SlurmLauncher"), ("local", "LocalLauncher"),
                             ("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")):
        assert compose(f"hydra/launcher={launcher}").hydra.launcher._target_.endswith(target)
    assert compose("hydra/launcher=slurm").hydra.launcher.gpus_per_node == 1


def test_optuna_pareto_search_end_to_end(tmp_path):
    """A few trials of the multi-objective search on stories260K: records, Optuna's Pareto front, the summary.

    bitsandbytes storage is impossible on this model (head_dim 8 < its smallest block, 32): those trials fail, are
    recorded, and the search goes on (the sampler is seeded, so the trials are the same every run)."""
    import yaml

    out = kvc_m(tmp_path, "experiment=pareto_search", *FAST, "hydra.sweeper.n_trials=4",
                "hydra.sweeper.sampler.n_startup_trials=4", "policy=choice(streaming,h2o)",
                "policy.budget=choice(0.25,0.5)", "storage=choice(bnb_nf4,int4,dense)", "layout=per_layer")
    assert out.returncode == 1, out.stderr[-3000:]  # failed trials are failed jobs: the exit status says so
    recs = records(tmp_path)
    ok = [r for r in recs if r["status"] == "ok"]
    failed = [r for r in recs if r["status"] != "ok"]
    assert len(recs) == 4 and ok and failed and {r["policy"] for r in recs} <= {"streaming", "h2o"}
    assert all(r["storage"] == "bnb_nf4" and "must divide head_dim" in r["error"] for r in failed)
    front = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())["solutions"]
    observed = {(round(r["metrics"]["ppl"], 6), round(r["metrics"]["compression_ratio"], 6)) for r in ok}
    assert front and all((round(s["values"][0], 6), round(s["values"][1], 6)) in observed for s in front)
    assert (tmp_path / "results" / "summary.md").exists()


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
