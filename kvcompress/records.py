"""Run records: one flat JSON object per run, written atomically to the run folder and a JSONL file."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

RECORDS_FILE = "records.jsonl"


def config_hash(resolved: dict) -> str:
    """Stable hash of what determines a run's result (model, cache, eval, seed, device, dtype)."""
    keys = ("model", "cache", "eval", "seed", "device", "dtype", "calibration")
    payload = json.dumps({k: resolved.get(k) for k in keys}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def versions() -> dict:
    import torch

    from kvcompress import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "kvcompress": __version__}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def append_jsonl(path: Path, obj) -> None:
    """One ``write`` of one whole line with O_APPEND: concurrent jobs never interleave or truncate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_records(path: Path) -> list[dict]:
    """Records from a JSONL file or every JSONL file under a folder (a partial last line is skipped)."""
    files = [path] if path.is_file() else sorted(Path(path).rglob("*.jsonl"))
    out = []
    for f in files:
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
