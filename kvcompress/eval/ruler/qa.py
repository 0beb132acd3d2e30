"""RULER's QA tasks: a question over its gold paragraph(s) hidden among distractor paragraphs of the same
dataset, SQuAD (``qa_1``, Rajpurkar et al., 2016) and HotpotQA (``qa_2``, Yang et al., 2018), scored part-of
(any accepted answer). They need the datasets from the Hugging Face hub; offline they are skipped with a
clear message (``QAUnavailable``), never faked.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlparse

from kvcompress.eval.ruler.haystack import assemble, fill_items
from kvcompress.eval.ruler.tasks import Haystacks, Sample

INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.")
HUB = {"squad": ("rajpurkar/squad", None), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor")}


class QAUnavailable(RuntimeError):
    """The QA dataset cannot be had (offline, or the hub failed); the task is skipped."""


@dataclass(frozen=True)
class QARow:
    question: str
    answers: tuple[str, ...]
    gold: tuple[str, ...]


@cache
def hub_reachable() -> bool:
    """One quick TCP probe of the hub (``HF_ENDPOINT`` or huggingface.co), so offline runs skip at once instead of
    waiting through the datasets library's retries."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


@cache
def load_qa(source: str) -> tuple[tuple[QARow, ...], tuple[str, ...]]:
    """(questions with their gold paragraphs, every distinct paragraph) of the validation split."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise QAUnavailable(f"{source} needs the Hugging Face hub ({HUB[source][0]}) and HF_*_OFFLINE=1 is set")
    if not hub_reachable():
        raise QAUnavailable(f"{source} needs the Hugging Face hub ({HUB[source][0]}), which cannot be reached "
                            "(offline); only the generated tasks run offline")
    try:
        from datasets import load_dataset

        repo, config = HUB[source]
        split = load_dataset(repo, config, split="validation")
    except Exception as e:
        raise QAUnavailable(f"{source}: the Hugging Face hub ({HUB[source][0]}) failed: {type(e).__name__}: {e}") from e
    rows, paragraphs = [], {}
    for r in split:
        if source == "squad":
            gold = (r["context"],)
            rows.append(QARow(r["question"], tuple(r["answers"]["text"]), gold))
        else:
            texts = {t: "".join(s) for t, s in zip(r["context"]["title"], r["context"]["sentences"], strict=True)}
            gold = tuple(texts[t] for t in dict.fromkeys(r["supporting_facts"]["title"]) if t in texts)
            rows.append(QARow(r["question"], (r["answer"],), gold))
            paragraphs.update(dict.fromkeys(texts.values()))
        paragraphs.update(dict.fromkeys(gold))
    return tuple(rows), tuple(paragraphs)


@dataclass(frozen=True)
class QA:
    source: str                   # squad | hotpotqa
    max_new_tokens: int = 32

    def make(self, rng: random.Random, hay: Haystacks, length: int, name: str) -> Sample:
        rows, paragraphs = load_qa(self.source)
        row = rows[rng.randrange(len(rows))]
        codec = hay.codec

        def body(room: int) -> tuple[list, list[int]]:
            docs, used = [], sum(len(codec.encode(g)) + 8 for g in row.gold)
            while used <= room:
                d = paragraphs[rng.randrange(len(paragraphs))]
                if d not in row.gold:
                    docs.append(d)
                    used += len(codec.encode(d)) + 8
            for g in row.gold:  # the last distractor is the one cut to length: golds go before it
                docs.insert(rng.randrange(max(1, len(docs) - 1)), g)
            items = (f"Document {i + 1}:\n{d}\n\n" for i, d in enumerate(docs + list(paragraphs)))
            units, kept, _ = fill_items(codec, items, room)
            whole = {k.split(":\n", 1)[1][:-2] for k in kept}
            if not set(row.gold) <= whole:
                raise ValueError(f"eval.lengths: {length} is too short for task {name} (its gold paragraphs)")
            return units, []

        prompt = assemble(codec, length, f"{INSTRUCTION}\n\nThe following are given documents.\n\n",
                          f"\n{INSTRUCTION}\n\nQuestion: {row.question}", " Answer:", body, name)
        return Sample(name, length, prompt, list(row.answers), metric="part")


QA_TASKS = {"qa_1": QA("squad"), "qa_2": QA("hotpotqa")}
