"""ChunkKV (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache Compression"): keep contiguous chunks of
tokens instead of single tokens, so a kept phrase stays whole.

The held slots (in position order) are cut into chunks of ``chunk`` tokens; a chunk's score is the sum of the
scorer's token scores s_i over it (heads averaged unless ``per_head``):  S_c = sum_{i in c} s_i.
Chunks are kept best-first. ``whole_chunks=false`` (default): the budget's remainder takes the best tokens of the
next chunk, so a row keeps exactly the budget (every method here holds its budget, so they compare at equal
memory). ``whole_chunks=true`` (the paper's and kvpress's: 1,008 of 1,024 tokens at chunk 10): the budget rounds
down to whole chunks, floor(budget / chunk) x chunk (the budget itself below one chunk). Protected sinks / recent
tokens come first, as in every policy, and count against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.checks import int_at_least
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.policy.wrapper import ScorerWrapper


class ChunkKV(ScorerWrapper):
    """Chunk scores = sums of any scorer's token scores (``scorer``; the YAML default is SnapKV)."""

    def __init__(self, scorer: EvictionPolicy | None = None, chunk: int = 10, whole_chunks: bool = False, **kwargs):
        self.chunk = int_at_least("policy.chunk", chunk, 1)
        self.whole_chunks = bool(whole_chunks)
        super().__init__(scorer, **kwargs)

    def target(self, owner: int) -> int:
        budget = super().target(owner)
        return (budget // self.chunk * self.chunk or budget) if self.whole_chunks else budget

    def score(self, c: Candidates) -> Tensor:  # chunks follow slot order (the eager store's): no captured form
        s, pos = self.scorer.score(c).float(), c.pos
        if not self.per_head and s.shape[1] > 1:
            s = s.mean(1, keepdim=True)
        s = s.expand(-1, max(s.shape[1], pos.shape[1]), -1)
        return chunk_priority(s.nan_to_num(0.0, 0.0, 0.0).masked_fill(pos >= PAD_POSITION, 0.0), self.chunk)


def chunk_priority(s: Tensor, chunk: int) -> Tensor:
    """(B, H, T) token scores -> priorities ordering tokens by their chunk's summed score, then by their own:
    n_chunks - rank(chunk) + rank-in-chunk / chunk, so every token of a better chunk comes first."""
    b, h, t = s.shape
    n = math.ceil(t / chunk)
    x = F.pad(s, (0, n * chunk - t)).view(b, h, n, chunk)
    order = torch.argsort(x.sum(-1), dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=s.device).expand_as(order))
    within = torch.argsort(torch.argsort(x, dim=-1, stable=True), dim=-1).float() / chunk  # 0 .. (chunk-1)/chunk
    prio = (n - rank).float()[..., None] + within
    return prio.view(b, h, n * chunk)[..., :t]
