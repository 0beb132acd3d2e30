"""Perplexity with the cache in the loop: windows fed ``chunk`` tokens at a time, batched.

ppl = exp(sum_w NLL_w / sum_w n_w) over windows w; its 95% interval is a bootstrap over windows
(``stats.ratio_ci``: windows resampled with their token counts), recorded as ``ppl/ci_low``, ``ppl/ci_high``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.cache.base import ModelSpec
from kvcompress.engine.session import Session
from kvcompress.eval.base import EvalContext, Evaluation, require
from kvcompress.eval.data import check_dataset, load_text, tokenize, wants_bos
from kvcompress.eval.stats import interval_metrics, ratio_ci


def text_windows(tokenizer, text: str, window: int, n_windows: int | None, bos: str | bool = "auto") -> torch.Tensor:
    """Consecutive non-overlapping windows (N, window) of the text's tokens, BOS first if the model wants it."""
    bos_id = wants_bos(tokenizer, bos)
    body = window - (bos_id is not None)
    if n_windows is not None:  # tokenize only as much text as needed (generously)
        text = text[: max(n_windows * body * 12, 10_000)]
    ids = tokenize(tokenizer, text)
    n = len(ids) // body if n_windows is None else min(n_windows, len(ids) // body)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {body}")
    w = torch.tensor(ids[: n * body]).view(n, body)
    if bos_id is not None:
        w = torch.cat([torch.full((n, 1), bos_id), w], dim=1)
    return w


def window_nll(model, windows: torch.Tensor, cache, chunk: int, bar=None, per_window: list | None = None
               ) -> tuple[float, int, dict]:
    """Summed NLL and scored-token count of a batch of windows (teacher-forced: ``Session.score``); memory report
    at the window's end. ``per_window`` (a list) is extended with each window's summed NLL."""
    session = Session(model, cache).start(windows.shape[0])
    total = torch.zeros(windows.shape[0], dtype=torch.float64, device=windows.device)

    def score(logits, lo, hi):
        nonlocal total
        target = windows[:, lo + 1 : hi + 1]
        logits = logits[:, : target.shape[1]].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        total += nll.view(target.shape).sum(1)
        if bar is not None:
            bar.update(1)

    session.score(windows, chunk, on_chunk=score)
    memory = session.finish("ppl")
    if per_window is not None:
        per_window.extend(total.tolist())
    return float(total.sum()), windows.numel() - windows.shape[0], memory


@dataclass
class Perplexity(Evaluation):
    name: ClassVar[str] = "ppl"
    defines_prompt: ClassVar[bool] = False  # teacher-forced windows: policy.when=prefill|both refused
    dataset: str = "wikitext2"
    window: int = 1024
    max_windows: int | None = 8
    chunk: int = 16
    batch_size: int = 4
    bos: str | bool = "auto"
    bootstrap: int = 1000  # resamples of windows for the 95% interval of ppl (0 = none)

    def check(self, spec: ModelSpec, data_dir: Path, tokenizer=None) -> None:
        require(self.bootstrap >= 0, "eval.bootstrap", ">= 0", self.bootstrap)
        require(2 <= self.window <= spec.max_position, "eval.window", f"in [2, {spec.max_position}]", self.window)
        require(1 <= self.chunk <= self.window, "eval.chunk", f"in [1, window={self.window}]", self.chunk)
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        require(self.max_windows is None or self.max_windows >= 1, "eval.max_windows", ">= 1 or null", self.max_windows)
        require(self.bos in ("auto", True, False), "eval.bos", "auto, true or false", self.bos)
        check_dataset(self.dataset, data_dir, min_tokens=self.window - 1, tokenizer=tokenizer)  # a window (BOS aside)

    def run(self, ctx: EvalContext) -> dict[str, float]:
        windows = text_windows(ctx.tokenizer, load_text(self.dataset, ctx.data_dir), self.window, self.max_windows,
                               self.bos).to(ctx.model.device)
        batches = windows.split(self.batch_size)
        steps = sum(math.ceil(self.window / self.chunk) for _ in batches)
        nll, count, memory, per_window = 0.0, 0, None, []
        with tqdm(total=steps, desc=f"ppl {self.dataset}", disable=not ctx.progress, leave=False) as bar:
            for batch in batches:
                s, n, mem = window_nll(ctx.model, batch, ctx.cache, self.chunk, bar, per_window)
                nll, count, memory = nll + s, count + n, memory or mem
        ci = ratio_ci(per_window, [windows.shape[1] - 1] * len(per_window), self.bootstrap, ctx.seed, np.exp)
        return {**interval_metrics("ppl", math.exp(nll / count), ci), "nll": nll / count, "n_tokens": count,
                "n_windows": len(windows), **memory}
