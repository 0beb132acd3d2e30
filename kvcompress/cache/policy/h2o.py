"""H2O (Zhang et al., 2023): keep the heavy hitters, the tokens with the largest attention
accumulated over every query since they arrived, plus a recent window.
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.buffers import fit
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.storage.base import TokenStore


class H2O(EvictionPolicy):
    """Accumulated attention, updated at every step from the cache's own attention weights.

    ``recent`` defaults to half the budget (half heavy hitters, half recent, as in the paper).
    """

    def __init__(self, budget: int | float = 512, sinks: int = 0, recent: int | float = 0.5, **kwargs):
        super().__init__(budget=budget, sinks=sinks, recent=recent, **kwargs)

    def queries_needed(self, owner: int, steps: int) -> int:
        return steps

    def observe(self, owner: int, weights: Tensor, pos: Tensor) -> None:
        w = self.group_weights(weights).sum(2)
        acc = fit(self.state[owner], w.shape[-1])
        self.state[owner] = w if acc is None else acc + w

    static_state = True

    def static_score(self, pos, weights, keys, acc):
        acc = acc + self.group_weights(weights).sum(2)
        return acc, acc

    def score(self, owner: int, store: TokenStore, pos: Tensor) -> Tensor:
        acc = fit(self.state[owner], store.length)
        return acc if acc is not None else pos.float().new_zeros(pos.shape)
