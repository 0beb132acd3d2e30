"""Prefill and decode throughput and per-token latency at a given context length and batch."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.cache.base import ModelSpec
from kvcompress.engine.generate import positions_like
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import check_dataset, load_text
from kvcompress.eval.ppl import text_windows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_prefill_decode(model, tokens: torch.Tensor, cache, decode_tokens: int, chunk: int | None,
                        bar=None) -> tuple[float, list[float], float]:
    """Prefill ``tokens[:, :C]`` then decode the next ``decode_tokens`` text tokens one at a time.

    Decoding is teacher-forced (same work as greedy), so its NLL comes for free. Returns prefill
    seconds, each decode step's seconds, and the summed NLL of the decoded tokens.
    """
    dev, B = model.device, tokens.shape[0]
    C = tokens.shape[1] - decode_tokens
    cache.reset(B)
    _sync(dev)
    t0 = time.perf_counter()
    chunk = chunk or C
    for lo in range(0, C, chunk):
        hi = min(lo + chunk, C)
        logits = model(tokens[:, lo:hi], positions_like(tokens[:, lo:hi], lo), cache,
                       select=torch.full((B,), hi - lo - 1, device=dev))
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    steps, nll = [], torch.zeros((), dtype=torch.float64, device=dev)
    for i in range(decode_tokens):
        nll += F.cross_entropy(logits[:, -1].float(), tokens[:, C + i], reduction="sum")
        if i + 1 == decode_tokens:
            break
        t = time.perf_counter()
        logits = model(tokens[:, C + i : C + i + 1], torch.full((B, 1), C + i, device=dev), cache)
        _sync(dev)
        steps.append(time.perf_counter() - t)
        if bar is not None:
            bar.update(1)
    return prefill_s, steps, float(nll)


def percentile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


@dataclass
class Speed(Evaluation):
    context: int = 1024
    batch_size: int = 1
    decode_tokens: int = 32
    prefill_chunk: int | None = None
    warmup: bool = True
    repeats: int = 3
    dataset: str = "wikitext2"

    def check(self, spec: ModelSpec, data_dir: Path) -> None:
        check_dataset(self.dataset, data_dir)
        limit = spec.max_position - self.decode_tokens
        require(1 <= self.context <= limit, "eval.context", f"in [1, max_position - decode_tokens = {limit}]",
                self.context)
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        require(self.decode_tokens >= 2, "eval.decode_tokens", ">= 2", self.decode_tokens)
        require(self.repeats >= 1, "eval.repeats", ">= 1", self.repeats)
        require(self.prefill_chunk is None or self.prefill_chunk >= 1, "eval.prefill_chunk", ">= 1 or null",
                self.prefill_chunk)

    def run(self, ctx: EvalContext) -> dict[str, float]:
        text = load_text(self.dataset, ctx.data_dir)
        length = self.context + self.decode_tokens
        tokens = text_windows(ctx.tokenizer, text, length, self.batch_size, bos=False).to(ctx.model.device)
        if tokens.shape[0] < self.batch_size:  # short text: repeat rows
            tokens = tokens.repeat(-(-self.batch_size // tokens.shape[0]), 1)[: self.batch_size]
        if self.warmup:
            time_prefill_decode(ctx.model, tokens[:, : min(64, self.context) + 4], ctx.cache, 4, self.prefill_chunk)
        total = self.repeats * (self.decode_tokens - 1)
        with tqdm(total=total, desc="decode", disable=not ctx.progress, leave=False) as bar:
            passes = [time_prefill_decode(ctx.model, tokens, ctx.cache, self.decode_tokens, self.prefill_chunk, bar)
                      for _ in range(self.repeats)]
        prefill_s = statistics.median(p for p, _, _ in passes)
        steps = [s for _, pass_steps, _ in passes for s in pass_steps]
        B, n, nll = self.batch_size, self.batch_size * self.decode_tokens, passes[0][2]
        return {
            "ppl": math.exp(nll / n),
            "nll": nll / n,
            "n_tokens": n,
            "prefill_tokens_per_s": B * self.context / prefill_s,  # medians over the timed passes
            "decode_tokens_per_s": statistics.median(B * len(s) / sum(s) for _, s, _ in passes),
            "decode_latency_ms_p50": 1000 * percentile(steps, 50),
            "decode_latency_ms_p90": 1000 * percentile(steps, 90),
            "prefill_s": prefill_s,
            **ctx.cache.memory_report(),
        }
