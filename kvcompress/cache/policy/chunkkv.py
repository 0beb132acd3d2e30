"""ChunkKV (Liu et al., 2025, "ChunkKV: Semantic-Preserving KV Cache Compression"): keep contiguous chunks of
tokens instead of single tokens, so a kept phrase stays whole.

The held slots (in position order) are cut into chunks of ``chunk`` tokens; a chunk's score is the sum of the
scorer's token scores s_i over it (heads averaged unless ``per_head``):  S_c = sum_{i in c} s_i.
Chunks are kept best-first. ``whole_chunks=false`` (default): the budget's remainder takes the best tokens of the
next chunk, so a row keeps exactly the budget B (every method here holds its budget, so they compare at equal
memory). ``whole_chunks=true`` (the paper's count, as kvpress's ChunkKVPress): the T held tokens are cut into
n = ceil(T / chunk) chunks from the first (the last one partial, r tokens) and the best k = max(1, floor(n B / T))
are kept; a chunk holding a protected (sink, recent, new) token is kept whole, so with the recent window over the
last chunk a row keeps (k - 1) chunk + r tokens (1,008 of a 1,024 budget at T = 2,048, chunk 20).
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

    def target(self, owner: int, held: int | None = None) -> int:
        budget = super().target(owner)
        if not self.whole_chunks or held is None or held <= budget:
            return budget
        n = math.ceil(held / self.chunk)
        return (max(1, n * budget // held) - 1) * self.chunk + held - (n - 1) * self.chunk

    def score(self, c: Candidates) -> Tensor:  # chunks follow slot order (the eager store's): no captured form
        s, pos = self.scorer.score(c).float(), c.pos
        if not self.per_head and s.shape[1] > 1:
            s = s.mean(1, keepdim=True)
        s = s.expand(-1, max(s.shape[1], pos.shape[1]), -1)
        return s.nan_to_num(0.0, 0.0, 0.0).masked_fill(pos >= PAD_POSITION, 0.0)

    def priority(self, score: Tensor, pos: Tensor, budget: int | Tensor, protect: int = 0) -> Tensor:
        token = super().priority(score, pos, budget, protect)  # protected: +inf, padding: -inf
        lifted = token == float("inf")
        if self.whole_chunks:  # a protected token's chunk stays whole
            score = score.masked_fill(lifted, float("inf"))
        return chunk_priority(score, self.chunk).masked_fill(lifted, float("inf")).masked_fill(
            token == float("-inf"), float("-inf"))


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
