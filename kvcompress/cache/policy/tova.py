"""TOVA (Oren et al., 2024): evict the token the current query attends to least."""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.buffers import fit
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.storage.base import TokenStore


class TOVA(EvictionPolicy):
    """Score = softmax weight of the step's last query (summed over the heads sharing a selection).

    At the end of prefill (``when=prefill|both``) the last prompt query's weights are used.
    """

    def queries_needed(self, owner: int, steps: int) -> int:
        return 1

    def observe(self, owner: int, weights: Tensor, pos: Tensor) -> None:
        self.state[owner] = self.group_weights(weights[:, :, -1:])[:, :, 0]

    def static_score(self, pos, weights, keys, state):
        return self.group_weights(weights[:, :, -1:])[:, :, 0], None

    def score(self, owner: int, store: TokenStore, pos: Tensor) -> Tensor:
        last = fit(self.state[owner], store.length)
        return last if last is not None else pos.float().new_zeros(pos.shape)
