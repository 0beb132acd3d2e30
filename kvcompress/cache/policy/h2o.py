"""H2O (Zhang et al., 2023): keep the heavy hitters, the tokens with the largest attention
accumulated over every query since they arrived, plus a recent window.
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates, group_weights


class H2O(EvictionPolicy):
    """Accumulated attention, updated at every step from the cache's own attention weights.

    ``recent`` defaults to half the budget (half heavy hitters, half recent, as in the paper).
    """

    def __init__(self, budget: int | float = 512, sinks: int = 0, recent: int | float = 0.5, **kwargs):
        super().__init__(budget=budget, sinks=sinks, recent=recent, **kwargs)

    captured = True

    def queries_needed(self, owner: int, steps: int) -> int:
        return steps

    def update(self, weights: Tensor, acc: Tensor | None, heads: int) -> Tensor:
        w = group_weights(weights, heads).sum(2)  # (B, heads, N): this step's queries' weights, summed
        return w if acc is None else acc + w

    def score(self, c: Candidates) -> Tensor:
        return c.state if c.state is not None else c.zeros()
