"""What a policy's score sees: the same candidates on both decode paths.

A method is one score with fixed shapes. The eager path (``EvictionPolicy.evict``) builds ``Candidates`` from a
store's held tokens; the captured path (``cache.policy.captured``) from a layer's fixed slots plus the step's new
tokens. Either way the method's two functions are called the same:

    state  = policy.update(weights, state, heads)   # a step's attention weights folded into the per-token state
    scores = policy.score(candidates)                # (B, 1|Hkv, N), higher = keep

``weights`` (B, Hq, n, N) are the softmax weights of the step's last n = ``queries_needed`` queries (padding
queries zeroed), summed over the layers reading the store; ``state`` is the per-token state (B, G, ..., N) as
``update`` last returned it, padded with zeros for tokens that arrived since (None before the first update);
``heads`` is the number of selection groups, 1 (heads share one selection) or Hkv (``per_head``).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


class Candidates:
    """The tokens a score ranks: positions (B, 1|Hkv, N) (``PAD_POSITION``: padding or an empty slot), the per-token
    state (or None), the owner (the store's first layer), the selection groups ``heads``, and the rotated keys
    and values (B, Hkv, N, D) through ``keys()`` / ``values()`` (read, or decoded, once and only when asked)."""

    def __init__(self, owner: int, pos: Tensor, state: Tensor | None, heads: int,
                 read: Callable[[], tuple[Tensor, Tensor]]):
        self.owner, self.pos, self.state, self.heads = owner, pos, state, heads
        self._read, self._kv = read, None

    def _tokens(self) -> tuple[Tensor, Tensor]:
        if self._kv is None:
            self._kv = self._read()
        return self._kv

    def keys(self) -> Tensor:
        return self._tokens()[0]

    def values(self) -> Tensor:
        return self._tokens()[1]

    def zeros(self) -> Tensor:
        """(B, 1|Hkv, N) float zeros: the score of a method that has observed nothing yet."""
        return self.pos.float().new_zeros(self.pos.shape)


def group_weights(weights: Tensor, heads: int) -> Tensor:
    """(B, Hq, n, N) -> (B, heads, n, N) in float32: the weights of the query heads sharing a selection, summed."""
    b, hq, n, t = weights.shape
    return weights.float().view(b, heads, hq // heads, n, t).sum(2)
