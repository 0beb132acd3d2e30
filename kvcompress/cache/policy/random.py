"""Random eviction: the baseline every scoring policy must beat.

Scores are uniform draws. ``reseed=true`` (default, as kvpress's RandomPress): the generator restarts from one seed
per step for every store, so every layer holding the same slots drops the same positions in that step (a prompt
compressed at once loses the same tokens everywhere, instead of each layer losing different ones, some of them
its sinks); steps draw differently (seed + step). ``reseed=false``: one generator advances across stores and
steps. Sinks and the recent window are protected as in every policy (``sinks``, ``recent``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.checks import fail, is_int
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates


class RandomPolicy(EvictionPolicy):
    """Uniform random scores, with the same sinks / recent protection as any policy."""

    def __init__(self, budget: int | float = 512, seed: int = 0, reseed: bool = True, **kwargs):
        if not is_int(seed):
            fail("policy.seed", "an int", seed)
        self.seed, self.reseed = seed, bool(reseed)
        super().__init__(budget=budget, **kwargs)

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.steps = 0

    def start_step(self, steps: int, pos) -> None:
        super().start_step(steps, pos)
        self.steps += 1

    def score(self, c: Candidates) -> Tensor:
        shape = (c.pos.shape[0], c.heads, c.pos.shape[-1])  # a host generator, drawn per eviction: eager only
        if self.reseed:
            self.generator.manual_seed(self.seed + self.steps)
        return torch.rand(shape, generator=self.generator).to(c.pos.device)
