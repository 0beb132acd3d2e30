"""The one atomic file writer: readers see the old file or the new one, never a half-written one.

    write_atomic(path, lambda tmp: tmp.write_text(text))   # write(tmp) fills the temporary; then it becomes ``path``

Used by calibration artefacts (``cache.artifacts``), run records and tables (``records``) and fetched model files
(``engine.assets``).

Standard library only, so every layer may import it.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a fresh temporary file beside ``path`` (it keeps ``path``'s suffix: savefig picks the format
    by it), flushed to disk, then renamed over ``path`` (``os.replace``, atomic within a folder). A failed or
    interrupted write leaves the previous file (or none) and removes the temporary."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
