"""Datasets of the offline ``kvc_*`` tasks, built from local files in the kvcompress data folder.

The folder is ``kvcompress.eval.data.default_data_dir()`` (``../shared/data``), or ``$KVC_DATA_DIR``, or a
``paths.data=...`` model arg / ``--metadata`` entry (lm-eval hands model args to ``custom_dataset``).
Everything is deterministic: no download, no randomness beyond fixed seeds.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

from datasets import Dataset, DatasetDict

from kvcompress.eval.data import DATASETS, default_data_dir, load_text
from kvcompress.eval.passkey import INTRO, NEEDLE, QUESTION, first_number

STOP = set("that this with they them then there their were when what your have from said into very just "
           "could would should about after before because while where which some also each other".split())


def data_dir(kwargs: dict) -> Path:
    given = kwargs.get("data_dir") or kwargs.get("paths.data") or os.environ.get("KVC_DATA_DIR")
    return Path(given).expanduser() if given else default_data_dir()


def _local(name: str, kwargs: dict) -> str:
    folder = data_dir(kwargs)
    path = folder / DATASETS[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"kvc task data: {path} not found (set KVC_DATA_DIR or the paths.data model arg)")
    return load_text(name, folder)


# -- kvc_wikitext2: rolling perplexity, one document per article -------------------------------------
def wikitext2_articles(text: str) -> list[str]:
    """Split WikiText-2 raw into articles at their top-level headings (`` = Title = ``), text kept verbatim."""
    starts = [m.start() for m in re.finditer(r"^ = [^=\n].*[^=\n] = $", text, flags=re.M)]
    bounds = zip(starts, starts[1:] + [len(text)], strict=True)
    return [text[a:b] for a, b in bounds if text[a:b].strip()] or [text]


def wikitext2(**kwargs) -> DatasetDict:
    return DatasetDict({"test": Dataset.from_dict({"page": wikitext2_articles(_local("wikitext2", kwargs))})})


def wikitext2_results(doc: dict, results: list) -> dict:
    (loglikelihood,) = results
    words, nbytes = len(re.split(r"\s+", doc["page"])), len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}


# -- kvc_tinystories_cloze: which word comes next (4 choices, all from the same story) ---------------
def _content(word: str) -> bool:
    return len(word) >= 4 and word.isalpha() and word.islower() and word not in STOP


def cloze_doc(story: str, index: int) -> dict | None:
    """The story's last content word that already occurred earlier is the answer; the context is everything
    before it; the 3 distractors are other content words of the same story (so the story must be recalled)."""
    words = [(m.group(0), m.start()) for m in re.finditer(r"[A-Za-z]+", story)]
    seen_before = {w for w, _ in words[: len(words) // 2]}
    pool = sorted({w for w, _ in words if _content(w)})
    for word, start in reversed(words[len(words) // 2:]):
        if _content(word) and word in seen_before and len(pool) >= 4:
            rng = random.Random(index)
            choices = rng.sample([w for w in pool if w != word], 3) + [word]
            rng.shuffle(choices)
            return {"context": story[:start].rstrip(), "choices": choices, "gold": choices.index(word)}
    return None


def tinystories_cloze(**kwargs) -> DatasetDict:
    stories = [s.strip() for s in _local("tinystories", kwargs).split("<|endoftext|>")][1:]  # the first is cut
    docs = [d for i, s in enumerate(stories) if s and (d := cloze_doc(s, i)) is not None]
    return DatasetDict({"test": Dataset.from_list(docs)})


# -- kvc_passkey: a 5-digit key hidden in TinyStories text at several depths -------------------------
PASSKEY_CHARS = (2000, 4000)  # haystack sizes (characters: ~500 and ~1000 SmolLM2 tokens)
PASSKEY_DEPTHS = (0.0, 0.5, 1.0, 0.25, 0.75)  # in this order, so that --limit 3 spans the prompt
PASSKEY_TRIALS = 3


def passkey_doc(haystack: str, chars: int, depth: float, trial: int) -> dict:
    rng = random.Random(f"{chars}-{depth}-{trial}")
    key = str(rng.randrange(10_000, 100_000))
    start = haystack.find(". ", rng.randrange(0, len(haystack) - 2 * chars)) + 2
    body = haystack[start : start + chars]
    body = body[: body.rfind(". ") + 1]
    cut = len(body) if depth >= 1 else body.find(". ", int(depth * len(body))) + 1 if depth > 0 else 0
    prompt = INTRO + body[:cut] + NEEDLE.format(key=key) + body[cut:].lstrip() + QUESTION
    return {"context": prompt, "key": key, "chars": chars, "depth": depth}


def passkey(**kwargs) -> DatasetDict:
    haystack = " ".join(_local("tinystories_train", kwargs).split())
    cells = [(c, d, t) for c in PASSKEY_CHARS for t in range(PASSKEY_TRIALS) for d in PASSKEY_DEPTHS]  # --limit 5:
    # the shorter haystack at every depth
    docs = [passkey_doc(haystack, c, d, t) for c, d, t in cells]
    return DatasetDict({"test": Dataset.from_list(docs)})


def passkey_results(doc: dict, results: list) -> dict:
    return {"acc": float(first_number(results[0]) == doc["key"])}
