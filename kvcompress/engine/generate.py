"""Driving the model with a cache: chunked prefill, decode, greedy and sampled generation."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvcompress.cache.base import PAD_POSITION, KVCache
from kvcompress.engine.model import Transformer


def require_finite(finite: Tensor, where: str) -> None:
    """Raise when ``finite`` (a bool tensor: every logit was finite) is False: NaN/inf logits are a failed run."""
    if not bool(finite):
        raise FloatingPointError(f"{where}: the model produced non-finite logits (NaN or inf) with this cache; "
                                 "the strategy's attention or stored keys/values overflowed")


def positions_like(tokens: Tensor, start: int | Tensor = 0) -> Tensor:
    """Absolute positions (B, T) for a block of tokens starting at ``start`` (int or (B,))."""
    steps = torch.arange(tokens.shape[1], device=tokens.device)[None]
    start = start[:, None] if isinstance(start, Tensor) else start
    return (steps + start).expand(tokens.shape[0], -1)


@torch.inference_mode()
def forward_chunks(model: Transformer, tokens: Tensor, cache: KVCache, chunk: int | None = None,
                   start: int = 0, on_chunk=None) -> Tensor:
    """Feed ``tokens`` (B, T) through ``cache`` ``chunk`` tokens at a time; logits (B, T, V).

    chunk=1 gives exact token-by-token decode semantics: every token attends to the cache as the
    strategy left it. ``on_chunk(logits, lo, hi)`` lets callers consume logits without keeping them.
    """
    T = tokens.shape[1]
    chunk = chunk or T
    outs = []
    finite = torch.ones((), dtype=torch.bool, device=tokens.device)
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        logits = model(tokens[:, lo:hi], positions_like(tokens[:, lo:hi], start + lo), cache)
        finite &= torch.isfinite(logits).all()  # device-side: one sync at the end
        if on_chunk is None:
            outs.append(logits)
        else:
            on_chunk(logits, lo, hi)
    require_finite(finite, "forward_chunks")
    return torch.cat(outs, 1) if outs else torch.empty(0)


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
def prefill(model: Transformer, prompts: Sequence[Sequence[int]], cache: KVCache, chunk: int | None = None,
            pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prefill prompts of any lengths (right-padded, pads at PAD_POSITION, never attended).

    Returns the last-position logits (B, V) and each row's next position (B,).
    """
    device = model.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lengths.max())
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), device=device)
    pos = positions_like(tokens)
    pos = torch.where(pos < lengths[:, None], pos, torch.full_like(pos, PAD_POSITION))
    last = torch.zeros(len(prompts), model.config.vocab_size, device=device, dtype=model.dtype)
    chunk = chunk or T
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        rows = (lengths - 1 >= lo) & (lengths - 1 < hi)  # rows whose last prompt token is here
        select = (lengths - 1 - lo).clamp(0, hi - lo - 1)
        logits = model(tokens[:, lo:hi], pos[:, lo:hi], cache, select=select)[:, 0]
        last = torch.where(rows[:, None], logits, last)
    require_finite(torch.isfinite(last).all(), "prefill")
    replay_prompt(model, tokens, pos, cache, chunk)
    cache.end_prompt()  # the explicit boundary: prefill-time compression acts at the next step
    return last, lengths


@torch.inference_mode()
def replay_prompt(model: Transformer, tokens: Tensor, pos: Tensor, cache: KVCache, chunk: int | None = None) -> None:
    """If the cache asks (``replay_wanted``: KVzip), feed the prompt ``tokens`` at ``pos`` (B, T) once more, right
    after itself (each row's real positions shifted by its length), for the cache to observe; it keeps none of it."""
    if not cache.replay_wanted():
        return
    real = pos < PAD_POSITION
    again = torch.where(real, pos + real.sum(1, keepdim=True), pos)
    chunk = chunk or tokens.shape[1]
    cache.replay(True)
    for lo in range(0, tokens.shape[1], chunk):
        hi = min(lo + chunk, tokens.shape[1])
        model(tokens[:, lo:hi], again[:, lo:hi], cache, select=torch.zeros_like(again[:, 0]))
    cache.replay(False)


@torch.inference_mode()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], cache: KVCache, max_new_tokens: int,
             sampling: Sampling | None = None, stop_ids: Sequence[int] = (), chunk: int | None = None,
             seed: int | None = None, on_token=None, progress: bool = False) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt; a row stops at any of ``stop_ids``.

    ``on_token(step)`` is called after every decode step (timing); ``progress`` shows a bar of decode steps.
    """
    sampling = sampling or Sampling()
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    cache.reset(len(prompts))
    logits, pos = prefill(model, prompts, cache, chunk)
    stop = torch.tensor(list(stop_ids), device=model.device, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    out: list[Tensor] = []
    bar = tqdm(total=max_new_tokens, desc="generate", disable=not progress, leave=False)
    finite = torch.ones((), dtype=torch.bool, device=model.device)
    for step in range(max_new_tokens):
        nxt = sampling.pick(logits, generator)
        out.append(nxt)
        bar.update(1)
        done |= torch.isin(nxt, stop)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        logits = model(nxt[:, None], pos[:, None], cache)[:, -1]
        finite &= torch.isfinite(logits).all()  # device-side: one sync after the loop
        pos = pos + 1
        if on_token is not None:
            on_token(step)
    bar.close()
    require_finite(finite, "generate")
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    stop_set = set(stop_ids)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))] for row in rows]
