"""Key-norm (Devoto et al., 2024): tokens whose keys have a low L2 norm draw the most attention,
so keep the lowest-norm keys. Needs no attention weights.
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates


class KeyNorm(EvictionPolicy):
    """Score = -||k|| per KV head (rotation keeps norms, so pre- or post-RoPE storage agree)."""

    captured = True

    def score(self, c: Candidates) -> Tensor:
        return -c.keys().float().norm(dim=-1)
