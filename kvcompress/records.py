"""Run records: one flat JSON object per run, written atomically to the run folder and a JSONL file."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from kvcompress import __version__
from kvcompress.atomic import write_atomic
from kvcompress.eval.data import dataset_path
from kvcompress.presets import settings as preset_settings

RECORDS_FILE = "records.jsonl"
REPO = Path(__file__).resolve().parents[1]
AXES = ("storage", "policy", "layout")  # records of the composed cache name each axis and its settings
# What a number depends on: the package and conf/, less the parts that only present or log results.
CODE_PATHS = ("kvcompress", "conf")
NOT_CODE = ("kvcompress/report", "kvcompress/loggers", "kvcompress/harness/table.py", "conf/experiment",
            "conf/logger")


def config_hash(resolved: dict, data: dict | None = None) -> str:
    """Stable hash of what determines a run's result (model, cache or its axes, eval, seed, device, dtype) and of
    the data it reads, by content (``data_fingerprint``): the same config over other text is another config."""
    keys = ("model", "cache", "storage", "policy", "layout", "eval", "seed", "device", "dtype", "calibration")
    payload = json.dumps({**{k: resolved.get(k) for k in keys}, "data": data}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def folder_digest(folder: Path) -> str:
    """Hash of every file's relative name and content under ``folder`` ("missing" when it is not a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def text_digest(name: str, data_dir: Path) -> str:
    """A dataset name or path by content: the hash of its local file, ``hub:<name>`` for a hub-only dataset,
    ``missing:<name>`` when it cannot be found (the evaluation's own check then says why)."""
    try:
        path = dataset_path(str(name), data_dir)
    except ValueError:
        return f"missing:{name}"
    return f"hub:{name}" if path is None else file_digest(path)


DATA_FIELDS = ("dataset", "haystack")  # eval settings that name a text file (conf/eval/*.yaml)


def data_fingerprint(resolved: dict) -> dict:
    """The data a run reads, by content: each text an eval setting names (``eval.dataset``, ``eval.haystack``)
    and the calibration text, hashed; an evaluation that names no text (lm_eval's tasks, passkey) reads the data
    folder, hashed whole. Resume keys on it: another data folder or an edited file is another config."""
    data_dir = Path(str((resolved.get("paths") or {}).get("data", "."))).expanduser()
    ev = resolved.get("eval") or {}
    out = {f"eval.{k}": text_digest(ev[k], data_dir) for k in DATA_FIELDS if isinstance(ev.get(k), str)}
    if not out:
        out["data_dir"] = folder_digest(data_dir)
    cal = (resolved.get("calibration") or {}).get("dataset")
    if cal:
        out["calibration.dataset"] = text_digest(cal, data_dir)
    return out


def host() -> dict:
    """Where a number was computed: low-bit codes amplify the host's floating-point rounding (the order of
    reductions depends on the vector ISA and the thread count), so a quantized ppl may move across machines."""
    import torch

    info = {"cpu": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "kvcompress": __version__}


def _git(*args: str, root: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_sha() -> str | None:
    out = _git("rev-parse", "HEAD")
    return out.strip() or None if out else None


def code_version(root: Path = REPO) -> str:
    """A short hash of the code that affects a number: the committed blobs of kvcompress/ and conf/ (less
    reporting and logging), plus ``-dirty<hash>`` of their uncommitted changes. Without git: ``pkg-<version>``.

    Two runs with the same code version ran the same code; resume skips only records of the run's own version.
    """
    spec = [*CODE_PATHS, *(f":(exclude){p}" for p in NOT_CODE)]
    tree = _git("ls-tree", "-r", "HEAD", "--", *CODE_PATHS, root=root)
    if not tree:
        return f"pkg-{__version__}"
    kept = [t for t in tree.splitlines() if not t.split("\t", 1)[-1].startswith(NOT_CODE)]
    version = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:12]
    diff = _git("diff", "HEAD", "--binary", "--", *spec, root=root) or ""
    untracked = (_git("ls-files", "--others", "--exclude-standard", "--", *spec, root=root) or "").split()
    if diff or untracked:
        h = hashlib.sha256(diff.encode())
        for name in sorted(untracked):
            h.update(name.encode())
            try:
                h.update((root / name).read_bytes())
            except OSError:
                continue
        version += f"-dirty{h.hexdigest()[:8]}"
    return version


@functools.cache
def running_code_version() -> str:
    """The code version of this process, computed once: a sweep's jobs run the modules imported when it started,
    whatever is edited in the tree meanwhile, so they all carry one version (and its table shows them together)."""
    return code_version()


def is_committed(path: Path) -> bool:
    """True when git tracks a file under ``path`` (a folder of published results)."""
    path = Path(path).resolve()
    root = path if path.is_dir() else path.parent
    while not root.exists():
        root = root.parent
    out = _git("ls-files", "--", str(path), root=root)
    return bool(out and out.strip())


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def append_jsonl(path: Path, obj) -> None:
    """One ``write`` of one whole line with O_APPEND: concurrent jobs never interleave or truncate.

    A file left mid-line by an interrupted write gets a newline first, so the new record starts its own line
    (the partial line stays, and the reader reports it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(obj, default=str) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"\n" + line if _ends_mid_line(fd) else line)
    finally:
        os.close(fd)


@dataclass
class CorruptLine:
    file: Path
    line: int
    text: str

    def __str__(self) -> str:
        snippet = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"{self.file}:{self.line}: not a JSON record: {snippet!r}"


class Records(list):
    """Records in file order, and ``corrupt``: the lines that were not JSON objects (file, line number)."""

    def __init__(self, items=(), corrupt: list[CorruptLine] | None = None):
        super().__init__(items)
        self.corrupt: list[CorruptLine] = list(corrupt or [])


def read_records(path: Path, warn: bool = True) -> Records:
    """Records from a JSONL file or every JSONL file under a folder.

    A line that is not a JSON object (a partial write) is never dropped silently: it is listed in
    ``.corrupt`` with its file and line number and, with ``warn``, reported as a warning.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
    out = Records()
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                out.append(obj)
            else:
                out.corrupt.append(CorruptLine(f, n, line))
    if warn:
        for c in out.corrupt:
            warnings.warn(f"skipping a corrupt record line: {c}", stacklevel=2)
    return out


# -- a record's settings, shown against its presets (tables, W&B run names) --------------------------------------
def flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested settings as ``(dotted.key, value)`` pairs."""
    out = []
    for k, v in d.items():
        out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    return out


@functools.cache
def preset(axis: str, name: str) -> dict:
    """The settings of ``conf/<axis>/<name>.yaml``, its defaults list resolved as Hydra composes it ({} when there is
    no such file or it cannot be read)."""
    try:
        conf = preset_settings(axis, name)
    except Exception:  # an unreadable preset only costs the short form
        return {}
    return {k: v for k, v in conf.items() if k != "_target_"}


def changed_settings(params: dict | None, axis: str | None = None, name: str | None = None) -> str:
    """``budget=0.25 sinks=4`` (nested settings dotted); with a preset (``conf/<axis>/<name>.yaml``) only those that
    differ from it."""
    defaults = dict(flat(preset(axis, name))) if axis and name else {}
    return " ".join(f"{k}={v}" for k, v in flat(params or {}) if k not in defaults or defaults[k] != v)


def has_axes(r: dict) -> bool:
    """A record of the composed cache (storage/policy/layout fields), not an old one with cache/cache_params only."""
    return any(r.get(axis) for axis in AXES)


def record_settings(r: dict) -> str:
    """The settings that differ from the presets, per axis (``conf/<axis>/<name>.yaml``); an old record (cache +
    cache_params, from before the three axes, whose presets are gone): all its settings."""
    if not has_axes(r):
        return changed_settings(r.get("cache_params"))
    return " ".join(p for p in (changed_settings(r.get(f"{a}_params"), a, r.get(a)) for a in AXES) if p)
