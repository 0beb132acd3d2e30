"""Run records: no stale calibration or weights, no swallowed records, no mixed code versions, the data's content
in the config, the short name of the effective settings, KV bytes per row and token."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kvcompress.records import (
    RECORDS_FILE,
    append_jsonl,
    code_version,
    config_hash,
    data_fingerprint,
    is_committed,
    read_records,
)
from kvcompress.run import per_row_and_token

# -- calibration keyed by the weights ---------------------------------------------------------------
STORIES_SHAPE = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True)


def test_calibration_key_depends_on_the_weights(stories, tmp_path):
    """Two checkpoints of one config (random stories260K-shaped models, same name ``local``) must not share a
    calibration file; the same weights (and text, settings) must."""
    from conftest import tiny_model

    from kvcompress.eval.calibration import Calibration, weights_fingerprint
    from kvcompress.eval.data import default_data_dir

    def checkpoint(seed: int):
        model = tiny_model(seed, **STORIES_SHAPE)
        model.config.name = "local"  # model=local: the name says nothing about the weights
        return model

    tok = stories[1]
    a, b = checkpoint(1), checkpoint(2)
    assert weights_fingerprint(a) != weights_fingerprint(b)
    key = lambda m, **kw: Calibration(m, tok, default_data_dir(), "tinystories", **{"tokens": 128, "window": 64,
                                      "cache_dir": tmp_path, "progress": False, **kw}).key
    assert key(a) != key(b)
    assert key(a) == key(checkpoint(1))
    assert key(a) != key(a, tokens=256) and key(a) != key(a.to(torch.bfloat16))


def test_calibration_key_is_a_file_name_for_a_path_dataset(stories, tmp_path):
    from kvcompress.eval.calibration import Calibration

    text = tmp_path / "sub dir" / "my text.txt"
    text.parent.mkdir()
    text.write_text("Once upon a time there was a cat. " * 40)
    key = Calibration(stories[0], stories[1], tmp_path, str(text), 64, 32, tmp_path, progress=False).key
    assert "/" not in key and " " not in key and key.startswith("stories260k-my_text-")


# -- records.jsonl with a partial last line ---------------------------------------------------------
def test_append_after_a_partial_line_starts_a_new_line(tmp_path):
    path = tmp_path / RECORDS_FILE
    append_jsonl(path, {"status": "ok", "cache": "full"})
    with open(path, "a") as f:
        f.write('{"status": "ok", "cac')  # an interrupted write
    append_jsonl(path, {"status": "ok", "cache": "h2o"})
    with pytest.warns(UserWarning, match=rf"{RECORDS_FILE}:2: not a JSON record"):
        recs = read_records(path)
    assert [r["cache"] for r in recs] == ["full", "h2o"]
    assert [(c.line, c.text) for c in recs.corrupt] == [(2, '{"status": "ok", "cac')]


def test_report_counts_corrupt_lines(tmp_path):
    from kvcompress.report import build_report

    path = tmp_path / RECORDS_FILE
    append_jsonl(path, {"status": "ok", "model": "m", "cache": "full", "eval": "ppl", "config_hash": "a",
                        "metrics": {"ppl": 2.0, "compression_ratio": 0.5}})
    with open(path, "a") as f:
        f.write("garbage\n")
    with pytest.warns(UserWarning):
        md = build_report(tmp_path)["md"].read_text()
    assert "1 corrupt line" in md and f"{RECORDS_FILE}:2" in md


# -- resume by code version -------------------------------------------------------------------------
def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture
def repo(tmp_path):
    for f in ("kvcompress/engine.py", "kvcompress/report/table.py", "conf/config.yaml", "results/x/records.jsonl"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text(f"# {f}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_code_version_follows_the_code_that_makes_numbers(repo):
    v0 = code_version(repo)
    assert len(v0) == 12 and "dirty" not in v0
    (repo / "kvcompress/report/table.py").write_text("# a report change\n")
    assert code_version(repo) == v0  # reporting does not change a number
    (repo / "kvcompress/engine.py").write_text("# an engine change\n")
    dirty = code_version(repo)
    assert dirty.startswith(v0 + "-dirty") and code_version(repo) == dirty
    (repo / "kvcompress/new.py").write_text("x = 1\n")  # an untracked module counts too
    assert code_version(repo) not in (v0, dirty)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "change")
    assert "dirty" not in code_version(repo) and code_version(repo) != v0


def test_code_version_without_git(tmp_path):
    assert code_version(tmp_path).startswith("pkg-")


def test_resume_skips_only_records_of_the_same_code(tmp_path):
    from kvcompress.report.jobs import finished_record

    for version in ("old", None):
        append_jsonl(tmp_path / RECORDS_FILE, {"status": "ok", "config_hash": "h", "code_version": version})
    assert finished_record(tmp_path, "h", "new") is None
    assert finished_record(tmp_path, "h", "new", compatible=["old"])["code_version"] == "old"
    append_jsonl(tmp_path / RECORDS_FILE, {"status": "ok", "config_hash": "h", "code_version": "new"})
    assert finished_record(tmp_path, "h", "new")["code_version"] == "new"


def test_report_names_its_code_version_and_leaves_others_out(tmp_path):
    """A table never mixes code versions (issue 26 item 3): it names the one it shows and the ones it leaves out."""
    from kvcompress.report.markdown import markdown
    from kvcompress.report.table import rows

    points = (("full", "aaa", 2.0), ("h2o", "bbb", 3.0))
    recs = [{"status": "ok", "model": "m", "cache": c, "eval": "ppl", "config_hash": c, "code_version": v,
             "metrics": {"ppl": p, "compression_ratio": 1.0}} for c, v, p in points]
    md = markdown(rows(recs, current="aaa"))
    assert "Code version: `aaa` (the current code)" in md and "`bbb` (1 record)" in md and "mixes" not in md
    assert "left out" not in markdown(rows(recs[:1], current="aaa"))


# -- committed results are written only on request ----------------------------------------------------
def test_committed_results_dir_needs_publish(repo, monkeypatch):
    from kvcompress.report.jobs import unpublished

    monkeypatch.chdir(repo)
    assert is_committed(repo / "results/x") and not is_committed(repo / "results/new")
    cfg = lambda **kw: OmegaConf.create({"results_dir": "results/x", "publish": False, **kw})
    assert "publish=true" in unpublished(cfg(), overrides=["experiment=compare_all", "model=stories260k"])
    assert unpublished(cfg(publish=True), overrides=[]) is None
    assert unpublished(cfg(), overrides=["results_dir=results/x"]) is None  # named on purpose
    assert unpublished(cfg(results_dir="results/new"), overrides=[]) is None


def test_kvc_does_not_add_to_committed_results(repo):
    """A preset's committed results_dir is left alone without publish=true; naming it on purpose writes."""
    from conftest import REPO

    conf = repo / "extra" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(f"# @package _global_\nresults_dir: {repo}/results/x\n")
    fast = ["model=stories260k", "eval.dataset=tinystories", "eval.window=64", "eval.max_windows=1", "progress=false",
            f"hydra.searchpath=[file://{repo / 'extra'}]", "experiment=mine", f"hydra.run.dir={repo}/run"]
    kvc = lambda *a: subprocess.run([sys.executable, "-m", "kvcompress.run", *fast, *a], cwd=REPO,
                                    capture_output=True, text=True, timeout=300)
    before = (repo / "results/x/records.jsonl").read_text()
    out = kvc()
    assert out.returncode != 0 and "publish=true" in out.stderr
    assert (repo / "results/x/records.jsonl").read_text() == before
    assert json.loads((repo / "run" / "record.json").read_text())["status"] == "failed"  # still recorded
    out = kvc("publish=true")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((repo / "results/x/records.jsonl").read_text().splitlines()[-1])["status"] == "ok"


def test_sweep_that_skips_everything_keeps_sweep_json(tmp_path):
    from kvcompress.report.callback import SweepReport

    results = tmp_path / "results"
    append_jsonl(results / RECORDS_FILE, {"status": "ok", "model": "m", "cache": "full", "eval": "ppl",
                                          "config_hash": "a", "metrics": {"ppl": 2.0}})
    (results / "sweep.json").write_text(json.dumps({"command": "kvc -m the original"}))
    cfg = OmegaConf.create({"results_dir": str(results), "publish": False, "logger": {},
                            "hydra": {"overrides": {"task": ["model=other"]}, "sweep": {"dir": str(tmp_path)}}})
    cb = SweepReport()
    cb.on_multirun_start(cfg)
    cb.on_multirun_end(cfg)  # no job wrote a record
    assert json.loads((results / "sweep.json").read_text())["command"] == "kvc -m the original"
    assert "kvc -m the original" in (results / "summary.md").read_text()
    cb.on_multirun_start(cfg)
    append_jsonl(results / RECORDS_FILE, {"status": "ok", "model": "m", "cache": "h2o", "eval": "ppl",
                                          "config_hash": "b", "metrics": {"ppl": 3.0}})
    cb.on_multirun_end(cfg)
    assert json.loads((results / "sweep.json").read_text())["command"] == "kvc -m model=other"




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


def test_short_name_follows_the_effective_settings():
    from kvcompress.harness.config import compose
    from kvcompress.job import cache_fields

    fields = cache_fields(compose({"storage": "int4", "storage.bits": 8}))
    assert (fields["storage"], fields["cache"]) == ("int8", "int8")
    fields = cache_fields(compose({"storage": "int4", "storage.bits": 8, "storage.group_size": 32}))
    assert fields["cache"] == "int8" and fields["storage_params"]["group_size"] == 32
    assert cache_fields(compose({"storage": "int4", "storage.group_size": 32}))["cache"] == "int4"
    assert cache_fields(compose({"storage": "kivi"}))["cache"] == "kivi"


def test_bytes_per_row_and_token():
    m = {"kv_bytes": 1200, "kv_bytes_fp16": 800, "kv_rows": 2}
    per_row_and_token(m, fp16_bytes_per_token=4)
    assert m["kv_bytes_per_row"] == 600 and m["kv_bytes_per_token"] == 1200 / (800 / 4)
