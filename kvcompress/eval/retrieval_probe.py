"""Synthetic passkey prompts for calibrations that measure retrieval (DuoAttention's head split).

Each calibration window gets a span of ``span`` random tokens (drawn from the window's own tokens) planted at a
depth, and the span's first ``cue`` tokens repeated at the end; the score is the NLL of the rest of the span, which
the model can only predict by finding the planted copy (induction / retrieval heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import KVCache
from kvcompress.engine.generate import forward_chunks
from kvcompress.engine.model import Transformer

DEPTHS = (0.15, 0.45)  # one planted span per window (two windows: a probe per head must stay cheap)


def planted(windows: Tensor, span: int = 24, cue: int = 8, seed: int = 0) -> tuple[Tensor, int]:
    """(N, W + span) prompts (N <= len(DEPTHS)) and the index of the first scored token (the recall's answer)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, w in enumerate(windows[: len(DEPTHS)].cpu()):
        key = w[torch.randint(0, w.numel(), (span,), generator=g)]
        at = int(DEPTHS[i] * w.numel())
        text = w.clone()
        text[at : at + span] = key
        rows.append(torch.cat([text, key]))
    return torch.stack(rows).to(windows.device), windows.shape[1] + cue


@torch.inference_mode()
def retrieval_nll(model: Transformer, windows: Tensor, cache: KVCache, chunk: int = 64) -> float:
    """Mean NLL of the planted spans' recalled tokens with ``cache`` in the loop (prompt fed ``chunk`` at a time)."""
    tokens, first = planted(windows)
    cache.reset(tokens.shape[0])
    logits = forward_chunks(model, tokens, cache, chunk)
    return float(F.cross_entropy(logits[:, first - 1 : -1].flatten(0, 1).float(), tokens[:, first:].flatten()))
