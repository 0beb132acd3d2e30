"""StreamingLLM (Xiao et al., 2024): attention sinks (the first tokens) plus a window of the most
recent tokens. Kept tokens keep their original positions unless ``rerotate=true``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.evict.base import EvictingCache
from kvcompress.cache.layered import KeyMode
from kvcompress.cache.store import TokenStore


class StreamingCache(EvictingCache):
    """Score = position, so the budget holds ``sinks`` first tokens and the last budget - sinks.

    ``rerotate=true`` is the paper's option of positions *within the cache*: keys are stored before
    RoPE and rotated at their slot index, queries are shifted to the slot after the last key.
    Causality still follows the original positions. Off by default: nothing is renumbered.
    Re-rotation assumes rows without padding.
    """

    def __init__(self, budget: int | float = 512, sinks: int = 4, rerotate: bool = False,
                 keys: KeyMode = "post_rope", **kwargs):
        self.rerotate = bool(rerotate)
        super().__init__(budget=budget, sinks=sinks, keys="pre_rope" if self.rerotate else keys, **kwargs)

    def score(self, layer: int, store: TokenStore, pos: Tensor) -> Tensor:
        return pos.float()

    def read(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        if not self.rerotate:
            return super().read(layer)
        k, v, pos = self.store_for(layer).read()
        slots = torch.arange(k.shape[2], device=k.device).expand(k.shape[0], -1)
        return self.rope.rotate(k, slots), v, pos

    def query_for(self, layer: int, q: Tensor, q_pos: Tensor, held: int) -> Tensor:
        if not self.rerotate:
            return q
        steps = q.shape[2]
        slots = torch.arange(held - steps, held, device=q.device)[None]
        return self.rope.rotate(q, slots - q_pos)
