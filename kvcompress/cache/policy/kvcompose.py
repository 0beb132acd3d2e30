"""KVCompose (Akulov et al., 2025, "KVCompose: Efficient Structured KV Cache Compression with Composite Tokens"):
each KV head keeps its own best tokens, but every head of a layer keeps the same number, so a layer's cache stays
one dense (Hkv, n_l, D) tensor; and the n_l are allocated across layers by one global ranking.

Composite token r of layer l = the r-th best token of every head of l, scored by the mean over heads of their r-th
best (aggregated attention) scores; one top-k over the composite tokens of every layer (K = layers x budget per row)
gives each layer its n_l (``cache/policy/global_budget.py``, ``granularity=composite``). Scores are the scorer's
(default H2O's accumulated attention over the prompt, the paper's aggregation), each layer's normalised to shares
of its total (``normalize=share``) before ranking. Departure: the paper aggregates attention with its own
query statistics; any scorer here.
"""
from __future__ import annotations

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.global_budget import GlobalBudget


class KVCompose(GlobalBudget):
    """Composite tokens (equal counts across a layer's heads, ragged across layers) under one global budget."""

    def __init__(self, scorer: EvictionPolicy | None = None, scope: str = "global", granularity: str = "composite",
                 floor: float = 0.0, normalize: str = "share", **kwargs):
        super().__init__(scorer, scope=scope, granularity=granularity, floor=floor, normalize=normalize, **kwargs)
