"""Generation over an engine session (``engine/session.py``): greedy and sampled, with stop ids; and the session's
calls as plain functions (``prefill``, ``forward_chunks``) for code that drives one batch with a given cache."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvcompress.cache.base import KVCache
from kvcompress.engine.model import Transformer
from kvcompress.engine.session import Session, positions_like, require_finite

__all__ = ["Sampling", "forward_chunks", "generate", "positions_like", "prefill", "require_finite"]


@torch.inference_mode()
def forward_chunks(model: Transformer, tokens: Tensor, cache: KVCache, chunk: int | None = None,
                   start: int = 0, on_chunk=None) -> Tensor:
    """Teacher-forced ``tokens`` (B, T) through ``cache`` (not reset: the caller's), ``chunk`` tokens at a time;
    logits (B, T, V) or ``on_chunk(logits, lo, hi)`` per chunk (``Session.score``)."""
    session = Session(model, cache)
    logits = session.score(tokens, chunk, start, on_chunk=on_chunk)
    require_finite(session.finite, "forward_chunks")
    return logits


@torch.inference_mode()
def prefill(model: Transformer, prompts: Sequence[Sequence[int]], cache: KVCache, chunk: int | None = None,
            pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """``Session.prefill`` on ``cache`` (not reset: the caller's): chunked, replayed if asked, prompt ended.
    Returns the last-position logits (B, V) and each row's next position (B,)."""
    session = Session(model, cache)
    last, lengths = session.prefill(prompts, chunk, pad_id)
    require_finite(session.finite, "prefill")
    return last, lengths


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0

    def pick(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Next token (B,) from last-position logits (B, V)."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k > 0:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > self.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], cache: KVCache | Session, max_new_tokens: int,
             sampling: Sampling | None = None, stop_ids: Sequence[int] = (), chunk: int | None = None,
             seed: int | None = None, on_token=None, progress: bool = False) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; a row stops at any of ``stop_ids``. ``cache``: a cache (eager
    decode) or a Session (its decode path).

    ``on_token(step)`` is called after every decode step (timing); ``progress`` shows a bar of decode steps.
    """
    session = cache if isinstance(cache, Session) else Session(model, cache)
    sampling = sampling or Sampling()
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    session.start(len(prompts))
    logits, pos = session.prefill(prompts, chunk)
    stop = torch.tensor(list(stop_ids), device=model.device, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    out: list[Tensor] = []
    bar = tqdm(total=max_new_tokens, desc="generate", disable=not progress, leave=False)
    for step in range(max_new_tokens):
        nxt = sampling.pick(logits, generator)
        out.append(nxt)
        bar.update(1)
        done |= torch.isin(nxt, stop)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        logits = session.step(nxt, pos)
        pos = pos + 1
        if on_token is not None:
            on_token(step)
    bar.close()
    session.finish("generate")
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    stop_set = set(stop_ids)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]
