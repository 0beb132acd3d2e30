"""Evaluation and calibration text: local files under the data folder, or the HF datasets hub online."""
from __future__ import annotations

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
    """``../shared`` beside the repository (a source checkout), else beside the working directory."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root.parent / "shared").is_dir():
            return root.parent / "shared"
    return Path(__file__).resolve().parents[2].parent / "shared"


def default_data_dir() -> Path:
    return default_shared_dir() / "data"


def check_dataset(name: str, data_dir: Path) -> None:
    """Fail fast for an unknown name; a path to a text file is accepted as is."""
    if name in DATASETS or Path(name).expanduser().is_file():
        return
    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}, or a path to a text file")


def load_text(name: str, data_dir: Path) -> str:
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    check_dataset(name, data_dir)
    rel, hub = DATASETS[name]
    local = Path(data_dir) / rel
    if local.is_file():
        return local.read_text(encoding="utf-8")
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
