"""README.md's commands, run; and the scripts and table folders that the READMEs and run scripts name exist.

Convention: a ``kvc``, ``kvc-report`` or ``kvc-lm-eval`` line in a fenced ``bash`` block of README.md ends with a
marker comment:

    kvc policy=h2o policy.budget=0.25 eval=fidelity      # doctest
    kvc eval=speed eval.context=2048                      # decode speed  # doctest: eval.context=128
    kvc model=local model.source=/path/to/folder          # no-doctest: needs your own checkpoint

``# doctest`` runs the command here on the stories260K model at tiny sizes: ``model=stories260k``, small
windows / contexts for whichever evaluation it names (only the settings that evaluation has), a small calibration,
results and Hydra outputs in a temporary folder. Overrides after ``# doctest:`` are applied last (they replace the
command's own value of the same key). ``# no-doctest: <reason>`` opts a command out and says why. Once README.md
uses the markers, every such command must carry one, so a new example cannot slip in untested.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, SHARED_REASON, STORIES

README = REPO / "README.md"
PROGRAMS = {"kvc": ["-m", "kvcompress.run"], "kvc-report": ["-m", "kvcompress.report.cli"],
            "kvc-lm-eval": ["-m", "kvcompress.harness"]}
MARKER = re.compile(r"#\s*(no-doctest|doctest)\b:?\s*(.*)$")
# tiny settings per evaluation key; a key is applied only when conf/eval/<eval>.yaml has it
TINY_EVAL = {"dataset": "tinystories", "window": 64, "max_windows": 2, "context": 64, "continuation": 8,
             "samples": 1, "decode_tokens": 4, "repeats": 1, "warmup": "false", "lengths": "[256]",
             "depths": "[0.5]", "trials": 1, "limit": 2, "bootstrap": 10, "prefill_chunk": 32, "max_batch": 4,
             "probe_batch": 1, "kv_budget_bytes": 2000000, "max_gen_toks": 8}
TINY_BY_EVAL = {"ruler": {"tasks": "[niah_single_1]", "lengths": "[384]"}}  # over TINY_EVAL, per evaluation
TINY = {"model": "stories260k", "progress": "false", "calibration.tokens": 256, "calibration.window": 64}


@dataclass
class Example:
    line: int
    command: str       # as written, without the marker
    marker: str        # doctest | no-doctest | "" (none)
    extra: str         # overrides after "# doctest:", or the no-doctest reason

    @property
    def program(self) -> str:
        return Path(shlex.split(self.command)[0]).name


def examples(text: str) -> list[Example]:
    """Every kvc / kvc-report / kvc-lm-eval line in README.md's fenced bash blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None
            continue
        if fence not in ("bash", "sh", "shell") or not line.strip():
            continue
        for part in line.split("&&"):
            part = part.strip()
            m = MARKER.search(part)
            command = part.split("#", 1)[0].strip()  # a description may come before the marker: "# what  # doctest"
            if command and Path(shlex.split(command)[0]).name in PROGRAMS:
                out.append(Example(n, command, m.group(1) if m else "", m.group(2).strip() if m else ""))
    return out


def eval_names(args: list[str]) -> list[str]:
    return next((a.split("=", 1)[1] for a in args if a.startswith("eval=")), "ppl").split(",")


def tiny_eval(args: list[str]) -> dict[str, object]:
    """Tiny settings for the evaluation(s) named in ``args`` (``eval=a,b``; default ppl): the keys that every one
    of them has in conf/eval/<name>.yaml."""
    from omegaconf import OmegaConf

    names = eval_names(args)
    keys = set.intersection(*[set(OmegaConf.load(REPO / "conf" / "eval" / f"{n}.yaml")) for n in names])
    tiny = {**TINY_EVAL, **(TINY_BY_EVAL.get(names[0], {}) if len(names) == 1 else {})}
    return {f"eval.{k}": v for k, v in tiny.items() if k in keys}


def with_overrides(args: list[str], overrides: dict[str, object]) -> list[str]:
    """``args`` with each ``key=value`` replaced (or appended): later values win."""
    out = list(args)
    for key, value in overrides.items():
        item = f"{key}={value}"
        at = [i for i, a in enumerate(out) if a.lstrip("+~").split("=", 1)[0] == key]
        if at:
            out[at[0]] = item
        else:
            out.append(item)
    return out


def tiny_command(ex: Example, tmp: Path) -> list[str]:
    words = shlex.split(ex.command)
    program, args = Path(words[0]).name, words[1:]
    if program == "kvc-report":
        return [sys.executable, *PROGRAMS[program], *args, "--out", str(tmp / "report"), *ex.extra.split()]
    if program == "kvc-lm-eval":
        return [sys.executable, *PROGRAMS[program], *args, "--output_path", str(tmp / "lm_eval"), *ex.extra.split()]
    extra = dict(o.split("=", 1) for o in shlex.split(ex.extra))
    tiny = {**TINY, **tiny_eval(args)}
    paths = {"results_dir": tmp / "results", "hydra.run.dir": tmp / "run", "hydra.sweep.dir": tmp / "sweep"}
    return [sys.executable, *PROGRAMS[program], *with_overrides(args, {**tiny, **paths, **extra})]


ALL = examples(README.read_text()) if README.is_file() else []
MARKED = [e for e in ALL if e.marker]
TO_RUN = [e for e in ALL if e.marker == "doctest"]


def test_marker_parsing():
    text = "\n".join(["```bash", "kvc eval=speed   # doctest: eval.context=128", "kvc -m policy=h2o,snapkv",
                      "bash scripts/setup.sh && .venv/bin/kvc-report results/x  # no-doctest: committed results",
                      "```", "kvc outside a fence  # doctest"])
    got = [(e.program, e.marker, e.extra) for e in examples(text)]
    assert got == [("kvc", "doctest", "eval.context=128"), ("kvc", "", ""),
                   ("kvc-report", "no-doctest", "committed results")]
    ex = examples(text)[0]
    cmd = tiny_command(ex, Path("/t"))
    assert "model=stories260k" in cmd and "eval.context=128" in cmd and "eval.window=64" not in cmd
    assert with_overrides(["model=local", "eval=ppl"], {"model": "stories260k"}) == ["model=stories260k", "eval=ppl"]


def test_every_readme_command_is_marked():
    """Once README.md uses the markers, a kvc command without one is an untested example."""
    if not MARKED:
        pytest.skip("README.md has no '# doctest' / '# no-doctest' markers yet (see this file's docstring)")
    unmarked = [f"README.md:{e.line}: {e.command}" for e in ALL if not e.marker]
    assert not unmarked, "mark these commands '# doctest' or '# no-doctest: <reason>':\n" + "\n".join(unmarked)
    reasonless = [f"README.md:{e.line}: {e.command}" for e in ALL if e.marker == "no-doctest" and not e.extra]
    assert not reasonless, "say why these are not run ('# no-doctest: <reason>'):\n" + "\n".join(reasonless)


@pytest.mark.skipif(not STORIES.exists(), reason=SHARED_REASON)
@pytest.mark.parametrize("ex", TO_RUN, ids=[f"L{e.line}" for e in TO_RUN])
def test_readme_command_runs(ex: Example, tmp_path):
    cmd = tiny_command(ex, tmp_path)
    env = {**os.environ, "KVC_CALIBRATION_DIR": str(tmp_path / "calibration"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, f"README.md:{ex.line}: {ex.command}\nran: {shlex.join(cmd)}\n{out.stderr[-3000:]}"
    if ex.program == "kvc":
        assert "[failed]" not in out.stdout, f"README.md:{ex.line}: a job failed:\n{out.stdout[-3000:]}"


DOCS = [README, *REPO.glob("results/**/README.md"), *REPO.glob("results/**/*.sh"), *REPO.glob("scripts/*.sh"),
        *REPO.glob("conf/**/*.yaml"), *REPO.glob("results/**/table.yaml")]
NAMED_FILE = re.compile(r"(?<![\w/.$-])((?:scripts|results)/[\w./-]+\.(?:py|sh|yaml))")
TABLE_COMMAND = re.compile(r"kvc-report --table ((?:results|scripts)/[\w./-]*\w)"
                           r"(?: --spec ((?:results|scripts)/[\w./-]+))?")


def test_named_scripts_and_table_folders_exist():
    """A README, run script or config that names a script, or a ``kvc-report --table`` folder, names one that is
    there (a removed table script left behind in the text fails here)."""
    gone = [f"{doc.relative_to(REPO)}: {m.group(1)}" for doc in DOCS for m in NAMED_FILE.finditer(doc.read_text())
            if not (REPO / m.group(1)).exists() and not (doc.parent / m.group(1)).exists()]
    assert not gone, "these files are named but do not exist:\n" + "\n".join(gone)
    specless = [f"{doc.relative_to(REPO)}: {m.group(1)}" for doc in DOCS
                for m in TABLE_COMMAND.finditer(doc.read_text())
                if not (REPO / (m.group(2) or f"{m.group(1)}/table.yaml")).is_file()]
    assert not specless, "`kvc-report --table` folders without a table.yaml or --spec:\n" + "\n".join(specless)


def test_named_file_patterns():
    text = "run `python scripts/quant_table.py`, then `kvc-report --table results/quant/storages`; $PY/scripts/x.py"
    assert [m.group(1) for m in NAMED_FILE.finditer(text)] == ["scripts/quant_table.py"]
    assert [m.group(1) for m in TABLE_COMMAND.finditer(text)] == ["results/quant/storages"]
