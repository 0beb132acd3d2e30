"""The kvc app end to end on the stories260K model: records, bad input, a user's own strategy."""
import json
import os
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
    for group, choice in (("cache", "full"), ("model", "stories260k"), ("eval", "ppl")):
        out = kvc(tmp_path, f"{group}=nope")
        assert out.returncode != 0
        assert "nope" in out.stderr and choice in out.stderr


def test_impossible_settings_fail_before_weights_load(tmp_path):
    """A model folder with a config but no weights: the setting's error must come first."""
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    for bad, msg in (("eval.chunk=0", "eval.chunk must be in [1, window=64]"),
                     ("eval.window=100000", "eval.window must be in [2, 512]"),
                     ("eval.dataset=nope", "valid choices: wikitext2")):
        out = kvc(tmp_path, *FAST, "model=local", f"model.source={folder}", bad)
        assert out.returncode == 1
        assert msg in out.stderr
    recs = records(tmp_path)
    assert [r["status"] for r in recs] == ["failed"] * 3
    assert all(r["error"] and "weights" not in r["error"] for r in recs)


def test_failed_run_after_start_still_writes_a_record(tmp_path):
    out = kvc(tmp_path, *FAST, "model=local", f"model.source={tmp_path}/missing")
    assert out.returncode == 1
    rec = records(tmp_path)[0]
    assert rec["status"] == "failed" and "does not exist" in rec["error"]


def test_a_users_own_strategy_plugs_in_without_editing_the_package(tmp_path):
    (tmp_path / "my_strategies.py").write_text(
        "from kvcompress.cache import FullCache\n"
        "class EveryOther(FullCache):\n"
        "    '''Keeps every other token: a toy eviction written outside the package.'''\n"
        "    def after_append(self, layer):\n"
        "        import torch\n"
        "        s = self.stores[layer]\n"
        "        s.keep(torch.arange(0, s.length, 2).expand(self.batch_size, -1))\n"
    )
    (tmp_path / "conf" / "cache").mkdir(parents=True)
    (tmp_path / "conf" / "cache" / "every_other.yaml").write_text("_target_: my_strategies.EveryOther\n")
    out = kvc(tmp_path, *FAST, "cache=every_other", f"hydra.searchpath=[file://{tmp_path}/conf]",
              env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    rec = records(tmp_path)[0]
    assert rec["cache"] == "every_other"
    assert rec["metrics"]["compression_ratio"] > 0.9  # half the tokens of a fp32 cache


def test_hub_id_offline_says_to_pass_a_local_path(tmp_path):
    out = kvc(tmp_path, *FAST, "model=local", "model.source=HuggingFaceTB/SmolLM2-135M", env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "Offline, pass a local path" in out.stderr
