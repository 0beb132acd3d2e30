"""Evaluation and calibration text: local files under the data folder, or the HF datasets hub online."""
from __future__ import annotations

import os
from pathlib import Path

# name -> (file under the data folder, (hub dataset, config, split, column) or None)
DATASETS: dict[str, tuple[str, tuple[str, str | None, str, str] | None]] = {
    "wikitext2": ("wikitext-2/wiki.test.raw", ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")),
    "tinystories": ("tinystories/TinyStoriesV2-GPT4-valid.first100.txt",
                    ("roneneldan/TinyStories", None, "validation", "text")),
    "tinystories_train": ("tinystories/TinyStories-train.head197KB.txt", None),
    "tinyshakespeare": ("tinyshakespeare/input.txt", None),
    "hamlet": ("long_docs/hamlet_gut.txt", None),
    "paradise_lost": ("long_docs/paradise_lost_gut.txt", None),
}


def default_shared_dir() -> Path:
    """``$KVC_SHARED_DIR``, else ``../shared`` beside the repository (a source checkout), else beside the working
    directory."""
    if os.environ.get("KVC_SHARED_DIR"):
        return Path(os.environ["KVC_SHARED_DIR"]).expanduser()
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root.parent / "shared").is_dir():
            return root.parent / "shared"
    return Path(__file__).resolve().parents[2].parent / "shared"


def default_data_dir() -> Path:
    """``$KVC_DATA_DIR``, else ``<shared>/data``."""
    if os.environ.get("KVC_DATA_DIR"):
        return Path(os.environ["KVC_DATA_DIR"]).expanduser()
    return default_shared_dir() / "data"


TEXT_SUFFIXES = (".txt", ".raw", ".md", ".text", ".json", ".jsonl")


def looks_like_path(name: str) -> bool:
    return any(c in name for c in "/\\") or name.startswith(("~", ".")) or Path(name).suffix in TEXT_SUFFIXES


def dataset_path(name: str, data_dir: Path) -> Path | None:
    """The local file of a dataset name or path; None for a known name without a local copy (hub only).

    Raises ValueError for a missing path (said so, not "unknown dataset") and for an unknown name.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ValueError(f"dataset {name!r} is a folder, not a text file")
    if name in DATASETS:
        local = Path(data_dir) / DATASETS[name][0]
        return local if local.is_file() else None
    if looks_like_path(name):
        raise ValueError(f"dataset file {path} does not exist (eval.dataset / calibration.dataset take a path to a "
                         f"UTF-8 text file or one of: {', '.join(DATASETS)})")
    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}, or a path to a text file")


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's contents; unreadable, binary and non-UTF-8 (e.g. Latin-1) files are a ValueError
    that names the file and says what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"text file {path} cannot be read: {e.strerror or e}") from e
    head = data[:65536]
    if b"\x00" in head or sum(b < 9 or 13 < b < 32 for b in head) > len(head) // 20 + 1:
        raise ValueError(f"text file {path} is binary (NUL or control bytes), not text; give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start]
        raise ValueError(
            f"text file {path} is not UTF-8 (byte 0x{bad:02x} at offset {e.start}; Latin-1 / Windows-1252 text?). "
            f"Convert it: iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as Path.read_text


def check_dataset(name: str, data_dir: Path, min_tokens: int = 0, tokenizer=None, setting: str = "eval.dataset"):
    """Fail fast, before weights load: an unknown name, a missing path, an unreadable / binary / non-UTF-8 / empty
    file, or a text with fewer than ``min_tokens`` tokens (counted with ``tokenizer``; without one, a text of fewer
    bytes than ``min_tokens`` is refused, as no token is shorter than a byte).
    """
    path = dataset_path(name, data_dir)
    if path is None:  # a named dataset fetched from the hub at run time
        return
    text = read_text_file(path)
    if not text.strip():
        raise ValueError(f"{setting}: text file {path} is empty")
    if min_tokens <= 0:
        return
    if tokenizer is None:
        n, unit = len(text.encode()), "bytes"
    else:  # a prefix is enough to decide (no token is shorter than one character)
        n, unit = len(tokenize(tokenizer, text[: 64 * min_tokens])), "tokens"
    if n < min_tokens:
        raise ValueError(f"{setting}: text file {path} is too short: {n} {unit}, and this evaluation needs at least "
                         f"{min_tokens} tokens (use a longer text or smaller window / context)")


def load_text(name: str, data_dir: Path) -> str:
    path = dataset_path(name, data_dir)
    if path is not None:
        return read_text_file(path)
    rel, hub = DATASETS[name]
    local = Path(data_dir) / rel
    if hub is None:
        raise FileNotFoundError(f"dataset {name!r}: {local} not found (no hub copy; set paths.data)")
    try:
        from datasets import load_dataset

        repo, config, split, column = hub
        rows = load_dataset(repo, config, split=split)[column]
        return ("\n\n" if name == "wikitext2" else "\n<|endoftext|>\n").join(rows)
    except Exception as e:
        raise FileNotFoundError(
            f"dataset {name!r}: not found at {local}, and the HF hub ({hub[0]}) failed: {type(e).__name__}: {e}"
        ) from e


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of a whole text, no special tokens (callers add BOS where the model expects it)."""
    return tokenizer(text, add_special_tokens=False).input_ids


def wants_bos(tokenizer, bos: str | bool) -> int | None:
    """The BOS id to prepend to each window: ``auto`` follows the tokenizer's own habit."""
    if bos == "auto":
        ids = tokenizer("a").input_ids
        bos = tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id
    return tokenizer.bos_token_id if bos and tokenizer.bos_token_id is not None else None
