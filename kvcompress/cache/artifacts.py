"""Saved calibration artefacts (projections, layer similarity): written atomically, read with a clear error.

    save(obj, path)                     # atomically (``kvcompress.atomic``): never a half-written file
    load(path, "low-rank calibration")  # any read/unpickle/zip error -> ValueError naming the file and the fix
    cached(path, make, "head split")    # (saved, True) if it exists (and passes check), else (make(), False) saved
    log("calibrated ...")               # a calibration's progress line, on stderr
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvcompress.atomic import write_atomic


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through the one atomic writer (``kvcompress.atomic``): an interrupted save leaves the previous
    file (or none), never a truncated one."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write_atomic(path, write)


def load(path: str | Path, what: str = "calibration file") -> Any:
    """``torch.load`` (weights only, to CPU); a missing, truncated or foreign file is a ValueError that names
    it and says to delete it so that it is re-created."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/unpickling/EOF errors name no file on their own
        raise ValueError(f"{what} {path} is unreadable or truncated ({type(e).__name__}: {e}); delete it and run "
                         "again to re-create it") from e


def cached(path: str | Path, make: Callable[[], Any], what: str = "calibration file",
           check: Callable[[Any], bool] | None = None) -> tuple[Any, bool]:
    """The one calibrate-and-cache rule: the artefact saved at ``path`` if there is one and ``check(saved)`` accepts
    it (True: reuse; False: stale, made again; raising: a ValueError naming the file and the fix), else ``make()``
    computed and saved there atomically. Returns (artefact, reused)."""
    path = Path(path).expanduser()
    if path.is_file():
        saved = load(path, what)
        if check is None or check(saved):
            return saved, True
    obj = make()
    save(obj, path)
    return obj, False
