"""``eval=ruler``: RULER's synthetic long-context tasks with the cache in the loop, both protocols, with
bootstrap confidence intervals.

Metrics (fractions in [0, 1], every one with ``/ci_low`` and ``/ci_high``, 95% percentile bootstrap over samples):
  ``<task>/<length>/acc``   mean score of the samples of one task at one length;
  ``<task>/all/acc``        per task, averaged over lengths;   ``all/<length>/acc``: per length, over tasks;
  ``accuracy``              overall: the mean of every (task, length) cell (stratified bootstrap).
With ``protocol=both`` the cell, task and length keys are prefixed ``query_aware/`` and ``query_agnostic/``,
each protocol has ``<protocol>/accuracy``, and ``accuracy`` averages both. ``n_samples`` counts scored prompts;
``skipped/<task> = 1`` marks a task that could not run (QA offline). The cache's memory report is the one
after the last batch at the longest length.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tqdm.auto import tqdm

from kvcompress.cache.base import ModelSpec
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import DATASETS, load_text, wants_bos
from kvcompress.eval.ruler.decode import answer
from kvcompress.eval.ruler.haystack import token_codec
from kvcompress.eval.ruler.qa import QA_TASKS, QAUnavailable
from kvcompress.eval.ruler.scoring import score
from kvcompress.eval.ruler.tasks import TASKS, Haystacks, Sample
from kvcompress.eval.stats import interval_metrics, mean_ci, stratified_mean_ci

log = logging.getLogger(__name__)
ALL_TASKS = {**TASKS, **QA_TASKS}
PROTOCOLS = ("query_aware", "query_agnostic", "both")
MIN_LENGTH = 128


def check_haystack(name: str, data_dir: Path) -> None:
    """Refuse an unknown name, a missing local file without a hub copy, and an empty file (before weights)."""
    path = Path(name).expanduser()
    require(name in DATASETS or path.is_file(), "eval.haystack",
            f"one of {', '.join(DATASETS)}, or a path to a text file", name)
    if not path.is_file():
        rel, hub = DATASETS[name]
        path = Path(data_dir) / rel
        if not path.is_file():
            require(hub is not None, "eval.haystack", f"a dataset with a local file (not found: {path}) or a hub "
                    "copy", name)
            return
    require(path.stat().st_size > 0 and path.read_text(encoding="utf-8", errors="replace").strip() != "",
            "eval.haystack", "a non-empty text file", str(path))


def sample_seed(seed: int, task: str, length: int, i: int) -> random.Random:
    """Each sample has its own stream: the same prompt whatever the other tasks, lengths or sample counts."""
    return random.Random(f"ruler/{seed}/{task}/{length}/{i}")


@dataclass
class Ruler(Evaluation):
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    samples: int = 4                      # prompts per task and length
    protocol: str = "query_aware"         # query_aware | query_agnostic | both
    haystack: str = "paradise_lost"       # real-text haystack and the cwe vocabulary (a dataset name or a path)
    chat: bool = False                    # wrap the prompt in the tokenizer's chat template when it has one
    max_new_tokens: int | None = None     # null = each task's own default
    batch_size: int = 4                   # prompts of one length per batch
    prefill_chunk: int | None = 512       # null = the whole context in one forward
    bootstrap: int = 1000                 # resamples for the 95% intervals (0 = no intervals)
    bos: str | bool = "auto"

    def new_tokens(self, task: str) -> int:
        return self.max_new_tokens or ALL_TASKS[task].max_new_tokens

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        require(isinstance(self.tasks, list) and len(self.tasks) >= 1, "eval.tasks", "a non-empty list of tasks",
                self.tasks)
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"eval.tasks: unknown task(s) {unknown}; valid tasks: {', '.join(ALL_TASKS)}")
        require(self.protocol in PROTOCOLS, "eval.protocol", " | ".join(PROTOCOLS), self.protocol)
        require(self.max_new_tokens is None or self.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1 or null",
                self.max_new_tokens)
        limit = spec.max_position - max(self.new_tokens(t) for t in self.tasks)
        require(isinstance(self.lengths, list) and len(self.lengths) >= 1
                and all(isinstance(n, int) and MIN_LENGTH <= n <= limit for n in self.lengths), "eval.lengths",
                f"a non-empty list of ints in [{MIN_LENGTH}, max_position - max_new_tokens = {limit}]", self.lengths)
        require(self.samples >= 1, "eval.samples", ">= 1", self.samples)
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        require(self.bootstrap >= 0, "eval.bootstrap", ">= 0", self.bootstrap)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)
        require(self.bos in ("auto", True, False), "eval.bos", "auto, true or false", self.bos)
        check_haystack(self.haystack, data_dir)

    def make_samples(self, hay: Haystacks, task: str, length: int, seed: int) -> list[Sample]:
        return [ALL_TASKS[task].make(sample_seed(seed, task, length, i), hay, length, task)
                for i in range(self.samples)]

    def protocols(self) -> list[str]:
        return list(PROTOCOLS[:2]) if self.protocol == "both" else [self.protocol]

    def run(self, ctx: EvalContext) -> dict[str, float]:
        tok = ctx.tokenizer
        codec = token_codec(tok, wants_bos(tok, self.bos), self.chat)
        if self.chat and not (codec.chat[0] or codec.chat[1]):
            log.warning("eval=ruler: eval.chat=true but the tokenizer has no chat template; plain prompts")
        hay = Haystacks(codec, cache(lambda: load_text(self.haystack, ctx.data_dir)))
        stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
        scores: dict[tuple[str, str, int], list[float]] = {}
        skipped: dict[str, float] = {}
        memory: dict[str, float] = {}
        generated: dict[str, dict[int, list[Sample]]] = {}
        for task in self.tasks:  # every prompt first: a length too short for a task fails before any decoding
            try:
                generated[task] = {n: self.make_samples(hay, task, n, ctx.seed) for n in self.lengths}
            except QAUnavailable as e:
                log.warning("eval=ruler: skipping task %s: %s", task, e)
                skipped[f"skipped/{task}"] = 1.0
        batches = -(-self.samples // self.batch_size) * len(self.lengths) * len(generated) * len(self.protocols())
        bar = tqdm(total=batches, desc="ruler", disable=not ctx.progress, leave=False)
        for task, samples in generated.items():
            for protocol in self.protocols():
                for n in self.lengths:
                    for lo in range(0, self.samples, self.batch_size):
                        batch = samples[n][lo : lo + self.batch_size]
                        outs = self.answer_batch(ctx, batch, protocol, stop)
                        scores.setdefault((protocol, task, n), []).extend(
                            score(tok.decode(o, skip_special_tokens=True), s.references, s.metric)
                            for o, s in zip(outs, batch, strict=True))
                        if n == max(self.lengths):
                            memory = ctx.cache.memory_report()
                        bar.update(1)
        bar.close()
        if not scores:
            raise RuntimeError(f"eval=ruler: every task was skipped ({', '.join(skipped)})")
        return {**memory, **ruler_table(scores, self.bootstrap, ctx.seed), **skipped,
                "n_samples": sum(len(v) for v in scores.values())}

    def answer_batch(self, ctx: EvalContext, batch: list[Sample], protocol: str, stop: list[int]) -> list[list[int]]:
        if protocol == "query_aware":
            contexts, questions = [s.prompt.units for s in batch], [[] for _ in batch]
        else:
            contexts, questions = [s.prompt.context for s in batch], [s.prompt.question for s in batch]
        return answer(ctx.model, ctx.cache, contexts, questions, self.new_tokens(batch[0].task), stop,
                      self.prefill_chunk)


def ruler_table(scores: dict[tuple[str, str, int], list[float]], resamples: int, seed: int) -> dict[str, float]:
    """Cell, per-task, per-length and overall accuracies with their intervals (keys: module docstring)."""
    protocols = sorted({p for p, _, _ in scores})
    out: dict[str, float] = {}

    def put(name: str, groups: Iterable[list[float]]) -> None:
        groups = [g for g in groups if g]
        mean = sum(sum(g) / len(g) for g in groups) / len(groups)
        ci = mean_ci(groups[0], resamples, seed) if len(groups) == 1 else stratified_mean_ci(groups, resamples, seed)
        out.update(interval_metrics(name, mean, ci))

    for p in protocols:
        pre = f"{p}/" if len(protocols) > 1 else ""
        cells = {(t, n): v for (pp, t, n), v in scores.items() if pp == p}
        for (t, n), v in cells.items():
            put(f"{pre}{t}/{n}/acc", [v])
        for t in dict.fromkeys(t for t, _ in cells):
            put(f"{pre}{t}/all/acc", [v for (tt, _), v in cells.items() if tt == t])
        for n in dict.fromkeys(n for _, n in cells):
            put(f"{pre}all/{n}/acc", [v for (_, nn), v in cells.items() if nn == n])
        if pre:
            put(f"{p}/accuracy", list(cells.values()))
    put("accuracy", list(scores.values()))
    return out
