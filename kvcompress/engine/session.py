"""One engine session: the one place that drives the model with a cache in the loop (every evaluation and the
lm-eval model go through it).

* ``prefill(prompts)``: chunked prefill of right-padded prompts (pads sit at PAD_POSITION, never attended), then
  KVzip's replay when the cache asks for it (``KVCache.replay_wanted``: the prompt fed once more right after
  itself, observed and dropped), then the explicit prompt boundary ``KVCache.end_prompt()``: a policy's
  ``when=prefill|both`` compresses at the next step, whatever its size (a decode step or a teacher-forced chunk).
* ``step(tokens, pos)``: one token per row, eager, or over the cache's static-capacity form: ``decode="captured"``
  (``engine.static``: a CUDA graph on a GPU, the same static step elsewhere) or ``decode="compiled"``
  (``engine.compiled``: that step compiled by Inductor, eager where compiling fails); equal logits.
* ``score(tokens)``: teacher-forced forward in chunks, logits handed over per chunk. It defines no prompt: an
  evaluation made only of it (``eval=ppl``, ``eval=fidelity``) refuses prefill-time policies before weights load
  (``Evaluation.check_cache``); prefill + ``score`` of the rest gives scoring a prompt.

``start(batch_size)`` begins a batch (resets the cache); non-finite logits anywhere fail the run at ``finish``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache
from kvcompress.engine.compiled import CompiledDecode
from kvcompress.engine.model import Transformer
from kvcompress.engine.static import CapturedDecode, static_form

DECODE = ("eager", "captured", "compiled")


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


def padded(prompts: Sequence[Sequence[int]] | Tensor, device, pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded tokens (B, T), their positions (pads at PAD_POSITION) and each row's length (B,)."""
    if isinstance(prompts, Tensor):
        tokens = prompts.to(device)
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=device)
        return tokens, positions_like(tokens), lengths
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.as_tensor(list(p), device=device)
    pos = positions_like(tokens)
    return tokens, torch.where(pos < lengths[:, None], pos, torch.full_like(pos, PAD_POSITION)), lengths


def chunk_bounds(length: int, chunk: int | None, join_single_tail: bool = False) -> list[tuple[int, int]]:
    """[lo, hi) steps of ``chunk`` tokens over ``length``; ``join_single_tail``: a 1-token last chunk joins the one
    before (``eval=prefill_decode``'s chunking since its first records, kept so that they stay comparable)."""
    chunk = chunk or max(length, 1)
    bounds = list(range(0, length, chunk)) + [length]
    if join_single_tail and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class Session:
    """The model and a cache over one batch at a time: prefill (replay, prompt boundary), decode steps, scoring.

    ``decode="captured"|"compiled"`` runs every step of the session (prefill included) on the cache's
    static-capacity form of ``capacity`` slots (default: the model's context), and decode steps through
    ``CapturedDecode`` / ``CompiledDecode``; a cache without such a form is refused with the reason.
    ``session.cache`` is the cache that holds the tokens (for its report); ``path`` names the step that ran
    (``eager``, ``graph``, ``compiled``, or ``static``: the static step run eagerly, where there is no CUDA graph
    or compiling failed) and ``compile_s`` its compile seconds (0 unless compiled).
    """

    def __init__(self, model: Transformer, cache: KVCache, chunk: int | None = None, decode: str = "eager",
                 capacity: int | None = None):
        if decode not in DECODE:
            raise ValueError(f"decode must be one of {', '.join(DECODE)}, got {decode!r}")
        self.model, self.eager, self.chunk, self.decode = model, cache, chunk, decode
        self.capacity = capacity or model.config.max_position
        self.cache, self.captured, self.batch = cache, None, None
        self.compile_s = 0.0
        self.finite = torch.ones((), dtype=torch.bool, device=model.device)

    # -- a batch -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def start(self, batch_size: int) -> Session:
        """Drop every token; the next calls feed a batch of ``batch_size`` rows."""
        if self.decode != "eager" and self.batch != batch_size:
            static = static_form(self.eager, self.capacity)
            if static is None:
                raise ValueError(f"decode={self.decode} needs a cache with a static-capacity form (dense, quantized "
                                 "and latent storages, fixed-budget decode-time policies); this one has none: use "
                                 "decode=eager")
            static.setup(self.model.config.spec())
            static.reset(batch_size)
            step = (CapturedDecode if self.decode == "captured" else CompiledDecode)(self.model, static, batch_size)
            self.cache, self.captured = static, step
            self.compile_s = getattr(step, "compile_s", 0.0)
        self.batch = batch_size
        self.cache.reset(batch_size)
        self.finite = torch.ones((), dtype=torch.bool, device=self.model.device)
        return self

    @property
    def path(self) -> str:
        """The decode step that runs: eager, graph (a CUDA graph), compiled, or static (the static step, eagerly)."""
        if self.captured is None:
            return "eager"
        if isinstance(self.captured, CompiledDecode):
            return "compiled" if self.captured.compiled else "static"
        return "graph" if self.captured.captured else "static"

    def finish(self, where: str) -> dict[str, float]:
        """Fail on non-finite logits seen since ``start``; the cache's memory report."""
        require_finite(self.finite, where)
        return self.cache.memory_report()

    # -- prefill -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]] | Tensor, chunk: int | None = None, pad_id: int = 0,
                join_single_tail: bool = False, end_prompt: bool = True) -> tuple[Tensor, Tensor]:
        """Feed prompts of any lengths ``chunk`` tokens at a time, replay them if the cache asks, end the prompt.
        Returns the last real position's logits (B, V) and each row's next position (B,)."""
        tokens, pos, lengths = padded(prompts, self.model.device, pad_id)
        chunk = chunk or self.chunk
        last = torch.zeros(tokens.shape[0], self.model.config.vocab_size, device=tokens.device, dtype=self.model.dtype)
        for lo, hi in chunk_bounds(tokens.shape[1], chunk, join_single_tail):
            rows = (lengths - 1 >= lo) & (lengths - 1 < hi)  # rows whose last prompt token is here
            select = (lengths - 1 - lo).clamp(0, hi - lo - 1)
            logits = self.model(tokens[:, lo:hi], pos[:, lo:hi], self.cache, select=select)[:, 0]
            last = torch.where(rows[:, None], logits, last)
        self.finite &= torch.isfinite(last).all()
        self.replay(tokens, pos, chunk)
        if end_prompt:
            self.cache.end_prompt()
        return last, lengths

    @torch.inference_mode()
    def replay(self, tokens: Tensor, pos: Tensor, chunk: int | None = None) -> None:
        """If the cache asks (``replay_wanted``: KVzip), feed its ``replay_prefix`` ids and then the prompt ``tokens``
        at ``pos`` (B, T) once more, right after the prompt (each row's real positions shifted by its length), for
        the cache to observe; it keeps none."""
        if not self.cache.replay_wanted():
            return
        real = pos < PAD_POSITION
        n = real.sum(1, keepdim=True)
        prefix = torch.tensor(self.cache.replay_prefix(), dtype=tokens.dtype, device=tokens.device)
        p = prefix.numel()
        tokens = torch.cat([prefix.expand(tokens.shape[0], p), tokens], 1)
        again = torch.cat([n + torch.arange(p, device=pos.device), torch.where(real, pos + n + p, pos)], 1)
        self.cache.replay(True)
        for lo, hi in chunk_bounds(tokens.shape[1], chunk):
            self.model(tokens[:, lo:hi], again[:, lo:hi], self.cache, select=torch.zeros_like(again[:, 0]))
        self.cache.replay(False)

    # -- decode ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: Tensor, pos: Tensor) -> Tensor:
        """One token per row (B,) at positions (B,): next-token logits (B, V), valid until the next step."""
        tok, at = tokens[:, None], pos[:, None]
        raw = self.model(tok, at, self.cache) if self.captured is None else self.captured(tok, at)
        logits = raw[:, -1]
        self.finite &= torch.isfinite(logits).all()  # device-side: read once, at finish
        return logits

    # -- teacher forcing ---------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, tokens: Tensor, chunk: int | None = None, start: int = 0, pos: Tensor | None = None,
              on_chunk: Callable[[Tensor, int, int], None] | None = None) -> Tensor:
        """Feed ``tokens`` (B, T) ``chunk`` tokens at a time at ``pos`` (default: ``start``, ``start`` + 1, ...);
        logits (B, T, V), or ``on_chunk(logits, lo, hi)`` per chunk without keeping them. Padding (PAD_POSITION)
        rows' logits may be anything. chunk=1: every token attends to the cache as the strategy left it."""
        pos = positions_like(tokens, start) if pos is None else pos
        outs = []
        for lo, hi in chunk_bounds(tokens.shape[1], chunk or self.chunk):
            logits = self.model(tokens[:, lo:hi], pos[:, lo:hi], self.cache)
            self.finite &= (torch.isfinite(logits).all(-1) | (pos[:, lo:hi] == PAD_POSITION)).all()
            if on_chunk is None:
                outs.append(logits)
            else:
                on_chunk(logits, lo, hi)
        return torch.cat(outs, 1) if outs else torch.empty(0)
