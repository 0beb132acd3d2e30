"""The repo stays ruff-clean (the rules in pyproject.toml)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    out = subprocess.run([ruff, "check", "--quiet", str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
