"""PyramidKV (Cai et al., 2024): SnapKV scoring with budgets that shrink linearly from the first
layer to the last; the total over layers equals layers x budget.
"""
from __future__ import annotations

import math

from kvcompress.cache.checks import number_in
from kvcompress.cache.policy.snapkv import SnapKV


class PyramidKV(SnapKV):
    """The unprotected part of the budget (budget - sinks - recent) follows an arithmetic schedule over layers
    from ``2 - 1/beta`` times the mean at layer 0 to ``1/beta`` times it at the last layer. Eager only (SnapKV's
    pooling; a budget per layer where the static form has one slot count).
    """

    def __init__(self, budget: int | float = 512, beta: float = 20.0, **kwargs):
        self.beta = number_in("policy.beta", beta, 1, math.inf)
        super().__init__(budget=budget, **kwargs)

    def layer_budget(self, owner: int, budget: int) -> int:
        layers = self.spec.num_layers
        protected = min(self.sinks + self.recent_tokens(budget), budget)
        free = budget - protected
        if layers == 1 or free == 0:
            return budget
        lo = free / self.beta
        hi = 2 * free - lo

        def cumulative(n: int) -> int:  # schedule summed over the first n layers, rounded
            return round(n * hi - (hi - lo) * n * (n - 1) / (2 * (layers - 1)))

        return protected + cumulative(owner + 1) - cumulative(owner)
