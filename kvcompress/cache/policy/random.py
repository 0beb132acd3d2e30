"""Random eviction: the baseline every scoring policy must beat."""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.checks import fail, is_int
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates


class RandomPolicy(EvictionPolicy):
    """Uniform random scores (seeded per batch), with the same sinks / recent protection as any policy."""

    def __init__(self, budget: int | float = 512, seed: int = 0, **kwargs):
        if not is_int(seed):
            fail("policy.seed", "an int", seed)
        self.seed = seed
        super().__init__(budget=budget, **kwargs)

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, c: Candidates) -> Tensor:
        shape = (c.pos.shape[0], c.heads, c.pos.shape[-1])  # a host generator, drawn per eviction: eager only
        return torch.rand(shape, generator=self.generator).to(c.pos.device)
