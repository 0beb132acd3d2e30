"""StreamingLLM (Xiao et al., 2024): attention sinks (the first tokens) plus a window of the most
recent tokens. Kept tokens keep their original positions unless ``rerotate=true`` (see the base).
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates


class StreamingLLM(EvictionPolicy):
    """Score = position, so the budget holds ``sinks`` first tokens and the last budget - sinks."""

    captured = True

    def __init__(self, budget: int | float = 512, sinks: int = 4, **kwargs):
        super().__init__(budget=budget, sinks=sinks, **kwargs)

    def score(self, c: Candidates) -> Tensor:
        return c.pos.float()
