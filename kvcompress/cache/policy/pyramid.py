"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"):
SnapKV scoring with per-layer budgets falling linearly from the first layer to the last.

``schedule=paper`` (default; the paper's code, KVCache-Factory's pyramidkv_utils, as kvpress 0.5.5 computes it):
with K the budget (the mean over layers), n the tokens seen by the fullest row, W SnapKV's window and L layers,

    lo = K / beta,  hi = 2K - lo;   if hi >= n - W:  hi = n - W,  lo = 2K - hi
    budget_l = hi - l (hi - lo) / (L - 1)                  (the whole layer budget: the window is in it)
    uniform K instead when not  n >= hi >= lo >= W          (small budgets: lo < W; kvpress falls back alike)

Rounding: each layer gets round(S(l + 1)) - round(S(l)) with S(m) = sum_{j < m} budget_j (kvpress rounds each
layer alone), so the L budgets sum to L x K exactly. ``schedule=free``: the earlier form, the unprotected part of
the budget (budget - sinks - recent) from ``2 - 1/beta`` times its mean at layer 0 to ``1/beta`` times it at the
last layer. Eager only (SnapKV's pooling; a budget per layer where the static form has one slot count).
"""
from __future__ import annotations

import math

from kvcompress.cache.checks import number_in, one_of
from kvcompress.cache.policy.snapkv import SnapKV

SCHEDULES = ("paper", "free")


class PyramidKV(SnapKV):
    """SnapKV with the layer schedule above (``beta`` >= 1 sets the top layer's share)."""

    def __init__(self, budget: int | float = 512, beta: float = 20.0, schedule: str = "paper", **kwargs):
        self.beta = number_in("policy.beta", beta, 1, math.inf)
        self.schedule = one_of("policy.schedule", schedule, SCHEDULES)
        super().__init__(budget=budget, **kwargs)

    def layer_budget(self, owner: int, budget: int) -> int:
        layers = self.spec.num_layers
        if layers == 1:
            return budget
        if self.schedule == "free":
            return self.free_budget(owner, budget, layers)
        seen = int(self.row_seen.max()) if hasattr(self, "row_seen") else self.spec.max_position  # check(): no row
        lo = budget / self.beta
        hi = 2 * budget - lo
        if hi >= seen - self.window:
            hi = seen - self.window
            lo = 2 * budget - hi
        return linear_share(owner, lo, hi, layers) if seen >= hi >= lo >= self.window else budget

    def free_budget(self, owner: int, budget: int, layers: int) -> int:
        protected = min(self.sinks + self.recent_tokens(budget), budget)
        free = budget - protected
        if free == 0:
            return budget
        lo = free / self.beta
        return protected + linear_share(owner, lo, 2 * free - lo, layers)


def linear_share(layer: int, lo: float, hi: float, layers: int) -> int:
    """The layer's share of a schedule falling linearly from ``hi`` (layer 0) to ``lo`` (the last layer), rounded as
    round(S(layer + 1)) - round(S(layer)) with S(n) the schedule summed over the first n layers."""

    def cumulative(n: int) -> float:
        return n * hi - (hi - lo) * n * (n - 1) / (2 * (layers - 1))

    return round(cumulative(layer + 1)) - round(cumulative(layer))
