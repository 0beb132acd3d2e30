"""Prefill-then-decode: prefill a context of N tokens, end the prompt there (the cache compresses it: a policy's
``when=prefill``), then score the next M tokens one at a time (``continuation_chunk=1``: decode steps) or
teacher-forced in chunks, so every scored token attends to the compressed history.

Samples are consecutive, non-overlapping (context + continuation) pieces of one text (several offsets
of a long document), batched ``batch_size`` at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.cache.base import KVCache, ModelSpec
from kvcompress.engine.model import Transformer
from kvcompress.engine.session import Session
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import check_dataset, load_text
from kvcompress.eval.ppl import text_windows
from kvcompress.eval.stats import interval_metrics, ratio_ci


@torch.inference_mode()
def continuation_nll(model: Transformer, tokens: torch.Tensor, cache: KVCache | Session, context: int,
                     prefill_chunk: int | None, bar=None, continuation_chunk: int = 1) -> tuple[float, float, dict]:
    """Summed NLL of ``tokens[:, context:]`` after prefilling ``tokens[:, :context]`` (replayed if the cache asks,
    then the prompt ends: prefill-time policies compress there); the continuation is teacher-forced
    ``continuation_chunk`` tokens at a time (1: decode steps). Also the NLL of the first continuation token alone
    (predicted by the prefill itself) and the memory report at the end.
    """
    session = (cache if isinstance(cache, Session) else Session(model, cache)).start(tokens.shape[0])
    last, _ = session.prefill(tokens[:, :context], prefill_chunk or context, join_single_tail=True)
    first = F.cross_entropy(last.float(), tokens[:, context], reduction="sum")
    total = first.double()

    def score(logits, lo, hi):
        nonlocal total
        for j in range(hi - lo):  # token by token, in order: the sum is the same for every continuation_chunk
            if context + lo + j + 1 < tokens.shape[1]:
                total += F.cross_entropy(logits[:, j].float(), tokens[:, context + lo + j + 1], reduction="sum")
        if bar is not None:
            bar.update(hi - lo)

    session.score(tokens[:, context:-1], continuation_chunk, start=context, on_chunk=score)
    return float(total), float(first), session.finish("prefill_decode")


@dataclass
class PrefillDecode(Evaluation):
    dataset: str = "hamlet"
    context: int = 4096          # prefill tokens (BOS included when the model uses one)
    continuation: int = 256      # tokens scored one by one after the prefill
    samples: int = 2             # (context + continuation) pieces of the text, at consecutive offsets
    batch_size: int = 1
    prefill_chunk: int | None = 512  # null = the whole context in one forward
    continuation_chunk: int = 1  # continuation tokens per teacher-forced step (1: each one a decode step)
    bos: str | bool = "auto"
    bootstrap: int = 1000        # resamples of the batches for ppl/ci_low, ppl/ci_high (0 = none; needs 2+ batches)

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        limit = spec.max_position - self.continuation
        require(2 <= self.context <= limit, "eval.context", f"in [2, max_position - continuation = {limit}]",
                self.context)
        require(self.continuation >= 1, "eval.continuation", ">= 1", self.continuation)
        require(self.samples >= 1, "eval.samples", ">= 1", self.samples)
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)
        require(1 <= self.continuation_chunk <= self.continuation, "eval.continuation_chunk",
                f"in [1, continuation={self.continuation}]", self.continuation_chunk)
        require(self.bos in ("auto", True, False), "eval.bos", "auto, true or false", self.bos)
        require(self.bootstrap >= 0, "eval.bootstrap", ">= 0", self.bootstrap)
        check_dataset(self.dataset, data_dir, min_tokens=self.context + self.continuation - 1,
                      tokenizer=tokenizer)

    def run(self, ctx: EvalContext) -> dict[str, float]:
        text = load_text(self.dataset, ctx.data_dir)
        pieces = text_windows(ctx.tokenizer, text, self.context + self.continuation, self.samples, self.bos)
        pieces = pieces.to(ctx.model.device)
        nll = first = 0.0
        memory: dict = {}
        per_batch: list[tuple[float, int]] = []  # (summed NLL, tokens): the bootstrap's units
        with tqdm(total=len(pieces) * (self.continuation - 1), desc="prefill+decode", disable=not ctx.progress,
                  leave=False) as bar:
            for batch in pieces.split(self.batch_size):
                s, f, memory = continuation_nll(ctx.model, batch, ctx.cache, self.context, self.prefill_chunk, bar,
                                                self.continuation_chunk)
                nll, first = nll + s, first + f
                per_batch.append((s, len(batch) * self.continuation))
        n = len(pieces) * self.continuation
        ci = ratio_ci(*zip(*per_batch, strict=False), resamples=self.bootstrap, seed=0, transform=np.exp)
        return {**interval_metrics("ppl", math.exp(nll / n), ci), "nll": nll / n, "n_tokens": n,
                "n_samples": len(pieces), "nll_first_token": first / len(pieces), **memory}
