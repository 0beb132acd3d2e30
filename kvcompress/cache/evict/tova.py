"""TOVA (Oren et al., 2024): evict the token the current query attends to least."""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.evict.base import EvictingCache, fit
from kvcompress.cache.store import TokenStore


class TOVACache(EvictingCache):
    """Score = softmax weight of the step's last query (summed over the heads sharing a selection).

    At the end of prefill (``when=prefill|both``) the last prompt query's weights are used.
    """

    def queries_needed(self, layer: int, steps: int) -> int:
        return 1

    def observe(self, layer: int, weights: Tensor, pos: Tensor) -> None:
        self.state[layer] = self.group_weights(weights[:, :, -1:])[:, :, 0]

    def score(self, layer: int, store: TokenStore, pos: Tensor) -> Tensor:
        last = fit(self.state[layer], store.length)
        return last if last is not None else pos.float().new_zeros(pos.shape)
