"""Passkey retrieval (Mohtashami & Jaggi, 2023): a random number hidden in repetitive filler at a
given depth of a prompt of exactly ``length`` tokens; the model must generate it (greedy).

Accuracy per (length, depth) cell, per depth, per length and overall, each with a 95% bootstrap interval over
its prompts (``<metric>/ci_low``, ``<metric>/ci_high``; ``stats.mean_ci``). Run it with ``cache=full``
for the ceiling: a small model may miss keys even with every token kept.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from kvcompress.cache.base import ModelSpec
from kvcompress.engine.generate import generate
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import tokenize, wants_bos
from kvcompress.eval.stats import interval_metrics, mean_ci

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.\n")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: str, bos: int | None) -> list[int]:
    """Token ids of exactly ``length`` tokens: intro, filler with the needle at ``depth`` (0 = right after the
    intro, 1 = right before the question; placed on a filler-sentence boundary), then the question.
    """
    head = ([bos] if bos is not None else []) + tokenize(tokenizer, INTRO)
    needle = tokenize(tokenizer, NEEDLE.format(key=key))
    tail = tokenize(tokenizer, QUESTION)
    unit = tokenize(tokenizer, FILLER)
    room = length - len(head) - len(needle) - len(tail)
    if room < 0:
        raise ValueError(f"eval.lengths: {length} tokens cannot hold the prompt ({length - room} needed)")
    filler = (unit * (room // len(unit) + 1))[:room]
    units = room // len(unit)
    cut = round(depth * units) * len(unit) if depth < 1 else room
    return head + filler[:cut] + needle + filler[cut:] + tail


def first_number(text: str) -> str:
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


@dataclass
class Passkey(Evaluation):
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2              # keys per (length, depth) cell, generated as one batch
    digits: int = 5
    prefill_chunk: int | None = 512  # null = the whole prompt in one forward
    bos: str | bool = "auto"
    bootstrap: int = 1000            # resamples of prompts for the 95% intervals (0 = none)

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        require(self.bootstrap >= 0, "eval.bootstrap", ">= 0", self.bootstrap)
        limit = spec.max_position - self.digits - 4
        require(len(self.lengths) >= 1 and all(128 <= n <= limit for n in self.lengths), "eval.lengths",
                f"a non-empty list of ints in [128, max_position - digits - 4 = {limit}]", self.lengths)
        require(len(self.depths) >= 1 and all(0.0 <= d <= 1.0 for d in self.depths), "eval.depths",
                "a non-empty list of fractions in [0, 1]", self.depths)
        require(self.trials >= 1, "eval.trials", ">= 1", self.trials)
        require(1 <= self.digits <= 12, "eval.digits", "in [1, 12]", self.digits)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)
        require(self.bos in ("auto", True, False), "eval.bos", "auto, true or false", self.bos)

    def run(self, ctx: EvalContext) -> dict[str, float]:
        rng = random.Random(ctx.seed)
        bos = wants_bos(ctx.tokenizer, self.bos)
        metrics: dict[str, float] = {}
        hits: dict[tuple[int, float], list[bool]] = {}
        for n in tqdm(self.lengths, desc="passkey", disable=not ctx.progress, leave=False):
            # every depth and trial of one length has the same prompt length: one batch, no padding
            cells = [d for d in self.depths for _ in range(self.trials)]
            keys = [str(rng.randrange(10 ** (self.digits - 1), 10**self.digits)) for _ in cells]
            prompts = [passkey_prompt(ctx.tokenizer, n, d, key, bos) for d, key in zip(cells, keys, strict=True)]
            outs = generate(ctx.model, prompts, ctx.cache, self.digits + 3, chunk=self.prefill_chunk)
            for d, o, k in zip(cells, outs, keys, strict=True):
                hits.setdefault((n, d), []).append(first_number(ctx.tokenizer.decode(o)) == k)
            if n == max(self.lengths):
                metrics.update(ctx.cache.memory_report())
        return {**metrics, **accuracy_table(hits, self.lengths, self.depths, self.bootstrap, ctx.seed)}


def accuracy_table(hits: dict[tuple[int, float], list[bool]], lengths: list[int], depths: list[float],
                   resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy per (length, depth) cell, per depth, per length and overall, with bootstrap intervals."""
    out: dict[str, float] = {}

    def put(name: str, xs: list[bool]) -> None:
        out.update(interval_metrics(name, sum(xs) / len(xs), mean_ci(xs, resamples, seed)))

    for (n, d), h in hits.items():
        put(f"acc_len{n}_depth{round(100 * d)}", h)
    for d in depths:
        put(f"acc_depth{round(100 * d)}", [x for (_, dd), h in hits.items() if dd == d for x in h])
    for n in lengths:
        put(f"acc_len{n}", [x for (nn, _), h in hits.items() if nn == n for x in h])
    put("accuracy", [x for h in hits.values() for x in h])
    out["n_prompts"] = sum(len(h) for h in hits.values())
    return out
