"""Run records: no stale calibration or weights, no swallowed records, no mixed code versions, errors that name the
file, the data's content in the config, the short name of the effective settings, KV bytes per row and token."""
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


# -- non-finite logits and metrics fail the run ------------------------------------------------------
class InfAttention:
    """Wraps a cache so that attention returns inf (as calibration tensors of 1e30 did)."""

    def __init__(self, cache):
        self.cache = cache

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def attend(self, *args, **kwargs):
        return self.cache.attend(*args, **kwargs) * float("inf")


def inf_model():
    from conftest import tiny_model

    model = tiny_model(0)
    with torch.no_grad():
        model.layers[0].attn.wo.weight.fill_(float("inf"))
    return model


def test_generate_fails_on_non_finite_logits():
    from kvcompress.cache import FullCache
    from kvcompress.engine.generate import generate

    model = inf_model()
    cache = FullCache()
    cache.setup(model.config.spec())
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        generate(model, [[1, 2, 3], [4, 5]], cache, 4)


def test_forward_chunks_fails_on_non_finite_logits():
    from kvcompress.cache import FullCache
    from kvcompress.engine.generate import forward_chunks

    model = inf_model()
    cache = FullCache()
    cache.setup(model.config.spec())
    cache.reset(1)
    with pytest.raises(FloatingPointError, match="forward_chunks"):
        forward_chunks(model, torch.tensor([[1, 2, 3, 4]]), cache, chunk=2, on_chunk=lambda *a: None)


def test_any_non_finite_metric_fails():
    from kvcompress.report.jobs import check_metrics

    for metrics in ({"accuracy": 0.0, "kl": float("nan")}, {"decode_tokens_per_s": float("inf")}):
        with pytest.raises(FloatingPointError, match="is (nan|inf)"):
            check_metrics(metrics)
    check_metrics({"ppl": 3.0, "compression_ratio": float("nan"), "kv_bytes": 0})  # documented exception
    check_metrics({"kvc_passkey/acc_stderr": float("nan"), "calibration_file": "x.pt"})


# -- text problems before weights load ---------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary\x00" * 10, "is binary"),
    ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e ".encode("latin-1") * 20, "is not UTF-8.*Latin-1"),
    (b"short text", "too short: 10 bytes"),
])
def test_bad_text_files_are_named(tmp_path, content, message):
    from kvcompress.eval.data import check_dataset, load_text

    path = tmp_path / "text.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        check_dataset(str(path), tmp_path, min_tokens=64)
    assert str(path) in str(e.value)
    if content and b"short" not in content:  # reading it fails too, with the file's name
        with pytest.raises(ValueError, match=str(path)):
            load_text(str(path), tmp_path)


def test_missing_path_is_missing_not_unknown(tmp_path):
    from kvcompress.eval.data import check_dataset

    with pytest.raises(ValueError, match="does not exist") as e:
        check_dataset(str(tmp_path / "nope.txt"), tmp_path)
    assert "unknown" not in str(e.value)
    with pytest.raises(ValueError, match="unknown dataset 'nope'; valid choices: wikitext2"):
        check_dataset("nope", tmp_path)


def test_too_few_tokens_with_a_tokenizer(stories, tmp_path):
    from kvcompress.eval.data import check_dataset

    path = tmp_path / "t.txt"
    path.write_text("Once upon a time, there was a little dog. " * 4)
    with pytest.raises(ValueError, match=r"too short: \d+ tokens.*needs at least 512"):
        check_dataset(str(path), tmp_path, min_tokens=512, tokenizer=stories[1])
    check_dataset(str(path), tmp_path, min_tokens=16, tokenizer=stories[1])


def test_text_problems_fail_before_weights_load(tmp_path):
    """The app refuses a binary text before loading weights: the model folder has no weights at all."""
    from conftest import STORIES

    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text((STORIES / "config.json").read_text())
    text = tmp_path / "bin.txt"
    text.write_bytes(b"\x00\xff" * 100)
    out = subprocess.run([sys.executable, "-m", "kvcompress.run", "model=local", f"model.source={folder}",
                          f"eval.dataset={text}", "eval.window=64", f"results_dir={tmp_path}/r",
                          f"hydra.run.dir={tmp_path}/run"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert f"text file {text} is binary" in out.stderr and "safetensors" not in out.stderr


# -- corrupt files name themselves -------------------------------------------------------------------
def test_truncated_artifact_names_the_file(tmp_path):
    from kvcompress.cache.artifacts import load, save

    path = save({"layers": [torch.randn(64, 8)]}, tmp_path / "cal" / "lowrank-x.pt")
    assert torch.equal(load(path)["layers"][0], torch.load(path)["layers"][0])
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"low-rank calibration {path} is unreadable.*delete it"):
        load(path, "low-rank calibration")


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    from kvcompress.cache import artifacts

    path = artifacts.save({"v": 1}, tmp_path / "sim.pt")

    def broken(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts.torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save({"v": 2}, path)
    monkeypatch.undo()
    assert artifacts.load(path) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["sim.pt"]


# -- tests that need ../shared skip with a reason without it ------------------------------------------
def test_tests_skip_without_shared(tmp_path):
    """Without the shared folder, tests that read it (a model config copied from it, the stories260K fixture) are
    skipped with the reason, not failed with FileNotFoundError."""
    from conftest import REPO

    tests = ["tests/test_run.py::test_impossible_settings_fail_before_weights_load", "tests/test_evict_eval.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "KVC_SHARED_DIR": str(tmp_path / "absent")})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "failed" not in out.stdout.splitlines()[-1] and "skipped" in out.stdout.splitlines()[-1]
    assert f"needs the shared data and models in {tmp_path / 'absent'}" in out.stdout


# -- GGUF conversions follow their source; a truncated GGUF names itself ------------------------
def write_gguf(path: Path, seed: int) -> None:
    """A tiny random llama GGUF (fp32 tensors, no tokenizer): 2 layers, hidden 16, 2 heads, 1 kv head."""
    import gguf

    g = torch.Generator().manual_seed(seed)
    hidden, layers, heads, kv, ff, vocab = 16, 2, 2, 1, 24, 32
    dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_context_length, 64), (w.add_embedding_length, hidden), (w.add_block_count, layers),
                   (w.add_feed_forward_length, ff), (w.add_head_count, heads), (w.add_head_count_kv, kv),
                   (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, vocab)):
        add(v)
    t = lambda *shape: torch.randn(*shape, generator=g).numpy()
    w.add_tensor("token_embd.weight", t(vocab, hidden))
    w.add_tensor("output_norm.weight", t(hidden))
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv * dim, hidden), "attn_v": (kv * dim, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden),
              "ffn_down": (hidden, ff), "attn_norm": (hidden,), "ffn_norm": (hidden,)}
    for i in range(layers):
        for name, shape in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class NoTokenizer:
    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True)


def load_gguf(path: Path):
    from kvcompress.engine.loaders import load_weights, read_config

    return load_weights(path, read_config(path, "g"))


def test_stale_gguf_conversion_is_rebuilt(tmp_path, capsys):
    from kvcompress.engine.loaders import _save_converted

    path = tmp_path / "m.gguf"
    write_gguf(path, 1)
    first = load_gguf(path)
    _save_converted(path, first, NoTokenizer())
    assert (tmp_path / "m.kvc" / "source.json").is_file()
    assert torch.equal(load_gguf(path).embed.weight, first.embed.weight)  # the conversion, fresh
    write_gguf(path, 2)  # the .gguf is replaced by another checkpoint
    second = load_gguf(path)
    assert not torch.equal(second.embed.weight, first.embed.weight)
    assert "changed since" in capsys.readouterr().err and not (tmp_path / "m.kvc").exists()
    os.utime(path, ns=(1, 1))  # same bytes, new mtime (a copy): still fresh, no rebuild
    _save_converted(path, second, NoTokenizer())
    os.utime(path, ns=(2, 2))
    assert torch.equal(load_gguf(path).embed.weight, second.embed.weight) and (tmp_path / "m.kvc").exists()


def test_truncated_gguf_names_the_file(tmp_path):
    from kvcompress.engine.loaders import _save_converted

    path = tmp_path / "m.gguf"
    write_gguf(path, 1)
    _save_converted(path, load_gguf(path), NoTokenizer())
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])  # overwritten by a truncated copy
    with pytest.raises(ValueError, match=rf"GGUF file {path} is truncated or corrupt.*download it again"):
        load_gguf(path)


def test_text_is_read_with_universal_newlines(tmp_path):
    """As Path.read_text did: WikiText-2's CRLF lines must not change tokens (or the harness's article split)."""
    from kvcompress.eval.data import load_text

    path = tmp_path / "crlf.txt"
    path.write_bytes(b" = Title = \r\n text\r\nmore\rend")
    assert load_text(str(path), tmp_path) == " = Title = \n text\nmore\nend"


def test_too_short_calibration_text_names_the_setting(stories, tmp_path):
    from kvcompress.eval.calibration import Calibration

    text = tmp_path / "short.txt"
    text.write_text("Once upon a time.")
    with pytest.raises(ValueError, match=r"calibration.dataset='.*short.txt' \(calibration.window=64\): the text has"):
        Calibration(stories[0], stories[1], tmp_path, str(text), 256, 64, tmp_path, progress=False)


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
