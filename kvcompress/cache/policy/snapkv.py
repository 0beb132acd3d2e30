"""SnapKV (Li et al., 2024): score tokens by the attention of an observation window of the latest
queries, smoothed by pooling over neighbouring tokens; the window itself is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.checks import fail, int_at_least, one_of
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates, group_weights

POOLINGS = ("max", "avg")


class SnapKV(EvictionPolicy):
    """Keeps the weight rows of the last ``window`` queries (across steps, so a prefill in small
    chunks or decode still sees a full window); score = their sum, pooled with ``kernel``.

    ``recent`` defaults to ``window``: the observation window's own tokens stay.
    """

    def __init__(self, budget: int | float = 512, sinks: int = 0, recent: int | float | None = None,
                 window: int = 32, kernel: int = 7, pooling: str = "max", **kwargs):
        int_at_least("policy.window", window, 1)
        if int_at_least("policy.kernel", kernel, 1) % 2 == 0:
            fail("policy.kernel", "an odd int >= 1", kernel)
        one_of("policy.pooling", pooling, POOLINGS)
        if recent is None:
            recent = min(window, budget - sinks) if isinstance(budget, int) else window
        self.window, self.kernel, self.pooling = window, kernel, pooling
        super().__init__(budget=budget, sinks=sinks, recent=recent, **kwargs)

    def queries_needed(self, owner: int, steps: int) -> int:
        return min(self.window, steps)

    def update(self, weights: Tensor, old: Tensor | None, heads: int) -> Tensor:
        rows = group_weights(weights, heads)  # (B, heads, n, T)
        if old is not None:
            rows = torch.cat([old, rows], 2)
        return rows[:, :, -self.window :].contiguous()

    def score(self, c: Candidates) -> Tensor:
        # pooling reads slot neighbours: slots in position order (the eager store), so no captured form
        return c.zeros() if c.state is None else self.pool(c.state.sum(2))

    def pool(self, s: Tensor) -> Tensor:
        if self.kernel == 1:
            return s
        b, h, t = s.shape
        x = s.reshape(b * h, 1, t)
        if self.pooling == "max":
            x = F.max_pool1d(x, self.kernel, stride=1, padding=self.kernel // 2)
        else:
            x = F.avg_pool1d(x, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        return x.reshape(b, h, t)
