"""Prefill-then-decode: prefill a context of N tokens, let the cache compress it, then score the next
M tokens one at a time (chunk 1), so every scored token attends to the compressed history.

Samples are consecutive, non-overlapping (context + continuation) pieces of one text (several offsets
of a long document), batched ``batch_size`` at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.cache.base import KVCache, ModelSpec
from kvcompress.engine.generate import positions_like, replay_prompt
from kvcompress.engine.model import Transformer
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import check_dataset, load_text
from kvcompress.eval.ppl import text_windows


@torch.inference_mode()
def continuation_nll(model: Transformer, tokens: torch.Tensor, cache: KVCache, context: int,
                     prefill_chunk: int | None, bar=None) -> tuple[float, float, dict]:
    """Summed NLL of ``tokens[:, context:]`` after prefilling ``tokens[:, :context]``; also the NLL of the
    first continuation token alone (predicted by the prefill itself) and the memory report at the end.
    """
    B, T = tokens.shape
    dev = tokens.device
    cache.reset(B)
    chunk = prefill_chunk or context
    bounds = list(range(0, context, chunk)) + [context]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:  # a 1-token last chunk would look like decode
        bounds.pop(-2)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        logits = model(tokens[:, lo:hi], positions_like(tokens[:, lo:hi], lo), cache,
                       select=torch.full((B,), hi - lo - 1, device=dev))
    replay_prompt(model, tokens[:, :context], positions_like(tokens[:, :context]), cache, chunk)  # KVzip only
    cache.end_prompt()
    first = F.cross_entropy(logits[:, -1].float(), tokens[:, context], reduction="sum")
    total = first.double()
    for i in range(context, T - 1):
        logits = model(tokens[:, i : i + 1], torch.full((B, 1), i, device=dev), cache)
        total += F.cross_entropy(logits[:, -1].float(), tokens[:, i + 1], reduction="sum")
        if bar is not None:
            bar.update(1)
    return float(total), float(first), cache.memory_report()


@dataclass
class PrefillDecode(Evaluation):
    dataset: str = "hamlet"
    context: int = 4096          # prefill tokens (BOS included when the model uses one)
    continuation: int = 256      # tokens scored one by one after the prefill
    samples: int = 2             # (context + continuation) pieces of the text, at consecutive offsets
    batch_size: int = 1
    prefill_chunk: int | None = 512  # null = the whole context in one forward
    bos: str | bool = "auto"

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        limit = spec.max_position - self.continuation
        require(2 <= self.context <= limit, "eval.context", f"in [2, max_position - continuation = {limit}]",
                self.context)
        require(self.continuation >= 1, "eval.continuation", ">= 1", self.continuation)
        require(self.samples >= 1, "eval.samples", ">= 1", self.samples)
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)
        require(self.bos in ("auto", True, False), "eval.bos", "auto, true or false", self.bos)
        check_dataset(self.dataset, data_dir, min_tokens=self.context + self.continuation - 1,
                      tokenizer=tokenizer)

    def run(self, ctx: EvalContext) -> dict[str, float]:
        text = load_text(self.dataset, ctx.data_dir)
        pieces = text_windows(ctx.tokenizer, text, self.context + self.continuation, self.samples, self.bos)
        pieces = pieces.to(ctx.model.device)
        nll = first = 0.0
        memory: dict = {}
        with tqdm(total=len(pieces) * (self.continuation - 1), desc="prefill+decode", disable=not ctx.progress,
                  leave=False) as bar:
            for batch in pieces.split(self.batch_size):
                s, f, memory = continuation_nll(ctx.model, batch, ctx.cache, self.context, self.prefill_chunk, bar)
                nll, first = nll + s, first + f
        n = len(pieces) * self.continuation
        return {"ppl": math.exp(nll / n), "nll": nll / n, "n_tokens": n, "n_samples": len(pieces),
                "nll_first_token": first / len(pieces), **memory}
