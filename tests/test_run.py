"""The kvc app end to end on the stories260K model: records, bad input, a user's own strategy."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import STORIES

FAST = ["model=stories260k", "eval.dataset=tinystories", "eval.window=64", "eval.max_windows=2", "progress=false"]


def kvc(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvcompress.run", *args, f"results_dir={tmp_path}/results",
           f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "results" / "records.jsonl").read_text().splitlines()]


def test_run_writes_a_complete_record(tmp_path):
    out = kvc(tmp_path, *FAST)
    assert out.returncode == 0, out.stderr
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert records(tmp_path) == [rec]
    for key in ("status", "error", "model", "cache", "cache_params", "eval", "eval_params", "seed", "device",
                "dtype", "metrics", "versions", "git_sha", "started_at", "duration_s"):
        assert key in rec
    assert rec["status"] == "ok" and rec["error"] is None
    assert (rec["model"], rec["cache"], rec["eval"]) == ("stories260k", "full", "ppl")
    assert rec["eval_params"]["window"] == 64
    m = rec["metrics"]
    for key in ("ppl", "nll", "n_tokens", "kv_bytes", "kv_bytes_fp16", "compression_ratio", "peak_memory_bytes"):
        assert key in m
    assert 1 < m["ppl"] < 100 and m["n_tokens"] == 2 * 63
    assert "ppl" in out.stdout and "compression_ratio" in out.stdout


def test_speed_run_records_latency(tmp_path):
    out = kvc(tmp_path, "model=stories260k", "eval=speed", "eval.context=64", "eval.decode_tokens=4",
              "eval.dataset=tinystories", "progress=false")
    assert out.returncode == 0, out.stderr
    m = records(tmp_path)[0]["metrics"]
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_latency_ms_p50", "decode_latency_ms_p90"):
        assert m[key] > 0


def test_unknown_names_list_the_choices(tmp_path):
    for group, choice in (("storage", "kivi"), ("policy", "snapkv"), ("layout", "minicache"), ("model", "stories260k"),
                          ("eval", "ppl")):
        out = kvc(tmp_path, f"{group}=nope")
        assert out.returncode != 0
        assert "nope" in out.stderr and choice in out.stderr


def test_impossible_settings_fail_before_weights_load(tmp_path):
    """A model folder with a config but no weights: the setting's error must come first."""
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    cases = (("eval.chunk=0", "eval.chunk must be in [1, window=64]"),
             ("eval.window=100000", "eval.window must be in [2, 512]"),
             ("eval.dataset=nope", "valid choices: wikitext2"),
             ("policy=h2o policy.budget=0", "policy=h2o: policy.budget must be"),
             ("storage=int4 storage.group_size=3", "group_size (or group_size)=3 must divide head_dim=8"),
             ("layout=minicache layout.start_layer=5", "layout.start_layer must be in [0, num_layers - 2 = 3]"),
             ("storage=latent policy=snapkv policy.per_head=true",
              "storage=latent policy=snapkv layout=per_layer: policy.per_head=true keeps different tokens per KV head"))
    for bad, msg in cases:
        out = kvc(tmp_path, *FAST, "model=local", f"model.source={folder}", *bad.split())
        assert out.returncode == 1
        assert msg in out.stderr
    recs = records(tmp_path)
    assert [r["status"] for r in recs] == ["failed"] * len(cases)
    assert all(r["error"] and "weights" not in r["error"] for r in recs)


def test_failed_run_after_start_still_writes_a_record(tmp_path):
    out = kvc(tmp_path, *FAST, "model=local", f"model.source={tmp_path}/missing")
    assert out.returncode == 1
    rec = records(tmp_path)[0]
    assert rec["status"] == "failed" and "does not exist" in rec["error"]


def readme_files(prefixes: tuple[str, ...]) -> dict[str, str]:
    """The README's fenced blocks whose first line is ``# <path>`` under one of ``prefixes``: path -> text."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", text, flags=re.S)
    return {path: body for path, body in blocks if path.startswith(prefixes)}


def test_readme_methods_plug_in_without_editing_the_package(tmp_path):
    """README's "Adding a method": a policy and a storage from a user's own package, composed with a layout."""
    files = readme_files(("my_methods/", "my_conf/"))
    assert {"my_methods/every_other.py", "my_methods/half.py", "my_conf/policy/every_other.yaml",
            "my_conf/storage/half.yaml"} <= set(files)
    for path, body in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    search = f"hydra.searchpath=[file://{tmp_path}/my_conf]"
    out = kvc(tmp_path, *FAST, "policy=every_other", search, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rec = records(tmp_path)[-1]
    assert (rec["cache"], rec["policy"], rec["storage"]) == ("every_other", "every_other", "dense")
    assert rec["metrics"]["tokens_held_mean"] == 32  # every other token of a 64-token window
    out = kvc(tmp_path, *FAST, "storage=half", "policy=every_other", "layout=cla", search,
              env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rec = records(tmp_path)[-1]
    assert rec["cache"] == "half+every_other+cla" and rec["metrics"]["shared_layers"] == 2
    # float16 K/V (+ int32 positions) on an fp32 model, half the tokens, half the layers' stores
    assert 3.0 < rec["metrics"]["compression_ratio"] < 4.0


def test_whole_cache_escape_hatch(tmp_path):
    (tmp_path / "my_cache.py").write_text(
        "from kvcompress.cache import FullCache\n\n\n"
        "class Mine(FullCache):\n"
        "    pass  # a user's class implementing the whole cache interface (here: the full cache)\n")
    (tmp_path / "conf" / "cache").mkdir(parents=True)
    (tmp_path / "conf" / "cache" / "mine.yaml").write_text("_target_: my_cache.Mine\n")
    search = f"hydra.searchpath=[file://{tmp_path}/conf]"
    out = kvc(tmp_path, *FAST, "cache=mine", search, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rec = records(tmp_path)[-1]
    assert rec["cache"] == "mine" and rec["policy"] is None
    out = kvc(tmp_path, *FAST, "cache=mine", "policy=h2o", search, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1 and "cannot be combined with policy=h2o" in out.stderr


def test_too_short_text_is_counted_in_tokens_before_weights_load(tmp_path):
    """The tokenizer loads without the weights, so a text too short for one window is refused by its token count."""
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    out = kvc(tmp_path, *FAST, f"eval.dataset={short}")
    assert out.returncode == 1 and "is too short" in out.stderr and "tokens, and this evaluation needs" in out.stderr
