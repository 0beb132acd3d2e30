"""Throughput at equal memory: the largest batch whose KV cache fits a byte budget, and its decode tokens/s.

This is how compressed caches win in serving (KIVI, H2O): the same memory holds more rows. Every pass runs on the
engine session (``eval.speed.session_for``: replay, prompt boundary, eager or captured decode). Bytes per row
are measured, never computed: one untimed pass at ``probe_batch`` rows gives ``kv_bytes / probe_batch``
(``budget_counts=allocated``: ``kv_bytes_allocated``, spare buffer capacity included)
after ``context + decode_tokens - 1`` tokens (the most a row holds here), the batch is
``min(max_batch, floor(budget / bytes_per_row))``, and an untimed pass at that batch verifies
``kv_bytes <= budget`` (shrinking ``B <- floor(B * budget / kv_bytes)`` if the cache is not linear in rows).

Defaults that run anywhere: ``context=null`` is ``min(1024, max_position - decode_tokens)``; ``kv_budget_bytes=auto``
is ``auto_fraction`` of the free GPU memory on CUDA, and on a CPU the fp16 full cache of ``auto_rows`` rows at this
context (``auto_rows x fp16_bytes_per_token x (context + decode_tokens - 1)``): how many rows of a compressed cache
fit in the memory that ``auto_rows`` uncompressed rows take.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcompress.cache.base import ModelSpec
from kvcompress.engine.session import Session
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import check_dataset, load_text
from kvcompress.eval.ppl import text_windows
from kvcompress.eval.speed import DECODE_PATHS, decode_rates, session_for, spread, time_prefill_decode, timed_passes

VERIFY_TRIES = 4
COUNTS = ("held", "allocated")  # kv_bytes (the tensors held) or kv_bytes_allocated (their whole buffers)
POOL = 64  # distinct text windows; larger batches repeat them (the work per row is the same)


def fit_batch(bytes_per_row: float, budget: int, max_batch: int) -> int:
    """Rows that fit: ``min(max_batch, floor(budget / bytes_per_row))`` (0 when not even one does)."""
    return min(max_batch, math.floor(budget / bytes_per_row)) if bytes_per_row > 0 else max_batch


def shrink(batch: int, held: int, budget: int) -> int:
    """A smaller batch after ``held > budget`` bytes were measured at ``batch`` rows."""
    return min(batch - 1, math.floor(batch * budget / held))


DEFAULT_CONTEXT = 1024


def free_device_bytes(device: torch.device, fraction: float) -> int:
    """``fraction`` of the accelerator's free memory (after the weights loaded): the ``auto`` budget."""
    if device.type != "cuda":
        raise ValueError(f"eval.kv_budget_bytes=auto needs a CUDA device (free GPU memory), got {device}; "
                         "give a number of bytes")
    return int(torch.cuda.mem_get_info(device)[0] * fraction)


def full_rows_bytes(spec: ModelSpec, rows: int, tokens: int) -> int:
    """The ``auto`` budget on a CPU: ``rows`` rows of the fp16 full cache holding ``tokens`` tokens each."""
    return rows * spec.fp16_bytes_per_token() * tokens


@dataclass
class Throughput(Evaluation):
    context: int | None = None     # null: min(1024, max_position - decode_tokens)
    kv_budget_bytes: int | float | str = "auto"
    auto_fraction: float = 0.5
    auto_rows: int = 8
    decode_tokens: int = 16
    probe_batch: int = 2
    max_batch: int = 4096
    prefill_chunk: int | None = 256
    repeats: int = 2
    dataset: str = "wikitext2"
    budget_counts: str = "held"
    decode_path: str = "eager"

    def tokens_per_row(self, spec: ModelSpec) -> int:
        """The context (``null``: the default, within the model's positions) and the decode tokens less one."""
        return self.effective_context(spec) + self.decode_tokens - 1

    def effective_context(self, spec: ModelSpec) -> int:
        return min(DEFAULT_CONTEXT, spec.max_position - self.decode_tokens) if self.context is None else self.context

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        check_dataset(self.dataset, data_dir)
        limit = spec.max_position - self.decode_tokens
        require(self.context is None or 1 <= self.context <= limit, "eval.context",
                f"null or in [1, max_position - decode_tokens = {limit}]", self.context)
        require(self.decode_tokens >= 2, "eval.decode_tokens", ">= 2", self.decode_tokens)
        require(self.effective_context(spec) >= 1, "eval.decode_tokens",
                f"< max_position = {spec.max_position} (room for a context)", self.decode_tokens)
        budget = self.kv_budget_bytes
        number = isinstance(budget, (int, float)) and not isinstance(budget, bool)
        require(budget == "auto" or (number and budget >= 1), "eval.kv_budget_bytes", "a positive number of bytes or "
                "auto (CUDA: free GPU memory x eval.auto_fraction; CPU: eval.auto_rows rows of the fp16 full cache)",
                budget)
        require(0 < self.auto_fraction <= 1, "eval.auto_fraction", "in (0, 1]", self.auto_fraction)
        require(isinstance(self.auto_rows, int) and self.auto_rows >= 1, "eval.auto_rows", "an int >= 1",
                self.auto_rows)
        require(self.probe_batch >= 1, "eval.probe_batch", ">= 1", self.probe_batch)
        require(self.max_batch >= 1, "eval.max_batch", ">= 1", self.max_batch)
        require(self.repeats >= 1, "eval.repeats", ">= 1", self.repeats)
        require(self.decode_path in DECODE_PATHS, "eval.decode_path", f"one of {DECODE_PATHS}", self.decode_path)
        require(self.budget_counts in COUNTS, "eval.budget_counts", f"one of {COUNTS}", self.budget_counts)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)

    def _rows(self, pool: torch.Tensor, batch: int) -> torch.Tensor:
        """``batch`` rows of context + decode tokens: the pool's text windows, repeated as needed."""
        return pool.repeat(-(-batch // pool.shape[0]), 1)[:batch]

    def _held(self, ctx: EvalContext, tokens: torch.Tensor) -> tuple[int, Session]:
        """Bytes counted against the budget after one untimed prefill + decode pass over ``tokens``, on a session of
        the decode path asked for at that batch (a static form reserves its whole capacity: that is what it holds)."""
        session = session_for(ctx, tokens.shape[1], self.decode_path)
        time_prefill_decode(session, tokens, self.decode_tokens, self.prefill_chunk)
        cache = session.cache
        return (cache.kv_bytes() if self.budget_counts == "held" else cache.kv_bytes_allocated()), session

    def budget(self, ctx: EvalContext) -> int:
        """The byte budget: a number as given, else ``auto`` (free GPU memory, or on a CPU ``auto_rows`` fp16 rows)."""
        if self.kv_budget_bytes != "auto":
            return int(self.kv_budget_bytes)
        if ctx.model.device.type == "cuda":
            return free_device_bytes(ctx.model.device, self.auto_fraction)
        spec = ctx.cache.spec
        return full_rows_bytes(spec, self.auto_rows, self.tokens_per_row(spec))

    def run(self, ctx: EvalContext) -> dict[str, float]:
        auto = self.kv_budget_bytes == "auto"
        budget, context = self.budget(ctx), self.effective_context(ctx.cache.spec)
        text = load_text(self.dataset, ctx.data_dir)
        pool = text_windows(ctx.tokenizer, text, context + self.decode_tokens, POOL, bos=False)
        pool = pool.to(ctx.model.device)
        per_row = self._held(ctx, self._rows(pool, self.probe_batch))[0] / self.probe_batch
        batch = fit_batch(per_row, budget, self.max_batch)
        require(batch >= 1, "eval.kv_budget_bytes", f">= one row's cache ({per_row:.0f} bytes at context "
                f"{context} + {self.decode_tokens} decode tokens)", budget)
        for _ in range(VERIFY_TRIES):
            tokens = self._rows(pool, batch)
            held, session = self._held(ctx, tokens)  # also the warm-up at the real batch
            if held <= budget:
                break
            batch = shrink(batch, held, budget)
            require(batch >= 1, "eval.kv_budget_bytes", f">= one row's cache ({held} bytes held)", budget)
        else:
            raise RuntimeError(f"no batch fits kv_budget_bytes={budget} after {VERIFY_TRIES} tries (last {held})")
        passes = timed_passes(session, tokens, self.decode_tokens, self.repeats, self.prefill_chunk, False,
                              ctx.progress)
        rate = spread("decode_tokens_per_s", decode_rates(passes, batch))
        return {
            "batch_size": batch,
            "batch_limit": "max_batch" if batch == self.max_batch else "kv_budget",
            "kv_budget_bytes": budget,
            "kv_budget_auto": int(auto),
            "context": context,
            "bytes_per_row": per_row,
            "kv_budget_used": held / budget,
            **rate,
            "decode_tokens_per_s_per_row": rate["decode_tokens_per_s"] / batch,
            "decode_path": session.path,
            **session.cache.memory_report(),
        }
