"""Key-norm (Devoto et al., 2024): tokens whose keys have a low L2 norm draw the most attention,
so keep the lowest-norm keys. Needs no attention weights.
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.storage.base import TokenStore


class KeyNorm(EvictionPolicy):
    """Score = -||k|| per KV head (rotation keeps norms, so pre- or post-RoPE storage agree)."""

    def score(self, owner: int, store: TokenStore, pos: Tensor) -> Tensor:
        k = store.read()[0]
        return -k.float().norm(dim=-1)

    def static_score(self, pos, weights, keys, state):
        return -keys().float().norm(dim=-1), None
