"""A user's own methods, from their own package as README "Adding a method" tells (``my_methods/`` + ``my_conf/`` on
``hydra.searchpath``): an fp8 e4m3 per-token storage (a codec) and a value-norm eviction policy. They pass the public
contract suite and run through ``kvc`` on both decode paths (eager, and the captured static-capacity step) with no
edit to kvcompress."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompress.testing import check_method

HERE = Path(__file__).resolve().parent
README = HERE.parents[1] / "README.md"
FILES = ("my_methods/value_norm.py", "my_conf/policy/value_norm.yaml", "my_methods/fp8.py", "my_conf/storage/fp8.yaml")


@pytest.fixture(autouse=True)
def user_package(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # as PYTHONPATH=. in the user's folder
    torch.set_num_threads(1)


def test_the_package_is_the_readme():
    """Every file of the package that README shows is shown as it is here: the README is what a user copies."""
    blocks = dict(re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", README.read_text(), flags=re.S))
    shown = [f for f in FILES if f in blocks]
    assert "my_methods/value_norm.py" in shown
    for f in shown:
        assert blocks[f] == (HERE / f).read_text(), f"README's {f} differs from tests/user_methods/{f}"


def test_value_norm_keeps_the_contract():
    outcomes = check_method(policy=HERE / "my_conf/policy/value_norm.yaml")
    assert all(o.startswith("ran") for o in outcomes.values()), outcomes
    assert sum(o == "ran, captured" for o in outcomes.values()) == 2  # dense and int4 (under the identity layout)


def test_fp8_storage_keeps_the_contract():
    outcomes = check_method(storage=HERE / "my_conf/storage/fp8.yaml")
    assert all(o.startswith("ran") for o in outcomes.values()), outcomes
    assert sum(o == "ran, captured" for o in outcomes.values()) == 2  # alone and under H2O (under the identity layout)


def kvc(tmp_path: Path, *args: str) -> dict:
    """One ``kvc`` run from the user's folder; its record."""
    cmd = [sys.executable, "-m", "kvcompress.run", *args, f"hydra.searchpath=[file://{HERE}/my_conf]",
           f"results_dir={tmp_path}/results", f"hydra.run.dir={tmp_path}/run", "progress=false"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads((tmp_path / "run" / "record.json").read_text())


def test_kvc_runs_them_on_both_decode_paths(tmp_path, shared):
    speed = ["model=stories260k", "eval=speed", "eval.context=64", "eval.decode_tokens=8", "eval.repeats=1",
             "eval.warmup=false", "eval.dataset=tinystories", "storage=fp8", "policy=value_norm"]
    eager = kvc(tmp_path / "eager", *speed, "eval.decode_path=eager")
    captured = kvc(tmp_path / "captured", *speed, "eval.decode_path=graph")
    assert (eager["storage"], eager["policy"]) == ("fp8", "value_norm")
    assert eager["metrics"]["decode_path"] == "eager"
    assert captured["metrics"]["decode_path"] in ("static", "graph")  # a CUDA graph where there is CUDA
    assert captured["metrics"]["ppl"] == pytest.approx(eager["metrics"]["ppl"], rel=1e-5)
