"""Failures fail loudly and by name: non-finite logits and metrics fail the run; bad or short text files, truncated
artefacts and GGUF files, stale GGUF conversions and a missing ../shared are named, before any weights load."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import NoTokenizer, write_gguf


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
