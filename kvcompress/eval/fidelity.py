"""Fidelity against the full cache: the same windows, fed the same way through the full cache and the
chosen cache in lockstep; per-token KL(full || cache) and top-1 agreement of the next-token distributions."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvcompress.cache import FullCache
from kvcompress.engine.session import Session
from kvcompress.eval.base import EvalContext
from kvcompress.eval.data import load_text
from kvcompress.eval.ppl import Perplexity, text_windows


@dataclass
class Fidelity(Perplexity):
    """Settings as ``eval=ppl``; also reports the full cache's perplexity on the same tokens. Teacher-forced, no
    prompt: ``policy.when=prefill|both`` are refused before weights load, as under ``eval=ppl``."""

    name: ClassVar[str] = "fidelity"
    max_windows: int | None = 4

    @torch.inference_mode()
    def run(self, ctx: EvalContext) -> dict[str, float]:
        model = ctx.model
        windows = text_windows(ctx.tokenizer, load_text(self.dataset, ctx.data_dir), self.window, self.max_windows,
                               self.bos).to(model.device)
        reference = FullCache()
        reference.setup(model.config.spec())
        sums = torch.zeros(4, dtype=torch.float64, device=model.device)  # kl, agree, nll cache, nll full
        count, memory = 0, None
        steps = len(windows.split(self.batch_size)) * math.ceil(self.window / self.chunk)
        with tqdm(total=steps, desc=f"fidelity {self.dataset}", disable=not ctx.progress, leave=False) as bar:
            for batch in windows.split(self.batch_size):
                session = Session(model, ctx.cache).start(batch.shape[0])
                full = Session(model, reference).start(batch.shape[0])
                for lo in range(0, batch.shape[1], self.chunk):
                    tokens = batch[:, lo : lo + self.chunk]
                    target = batch[:, lo + 1 : lo + 1 + self.chunk]
                    n = target.shape[1]
                    got = session.score(tokens, start=lo)[:, :n].float().log_softmax(-1)  # both in lockstep
                    ref = full.score(tokens, start=lo)[:, :n].float().log_softmax(-1)
                    sums += torch.stack([
                        F.kl_div(got, ref, log_target=True, reduction="sum"),
                        (got.argmax(-1) == ref.argmax(-1)).sum(),
                        -got.gather(-1, target[..., None]).sum(),
                        -ref.gather(-1, target[..., None]).sum(),
                    ]).double()
                    count += target.numel()
                    bar.update(1)
                full.finish("fidelity (full cache)")
                memory = memory or session.finish("fidelity")
        kl, agree, nll, nll_full = (sums / count).tolist()
        return {"kl": kl, "top1_agreement": agree, "ppl": math.exp(nll), "ppl_full": math.exp(nll_full),
                "delta_ppl_pct": 100 * (math.exp(nll - nll_full) - 1), "nll": nll, "n_tokens": count,
                "n_windows": len(windows), **memory}
