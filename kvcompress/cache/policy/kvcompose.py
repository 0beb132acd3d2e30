"""KVCompose (Akulov et al., 2025, "KVCompose: Efficient Structured KV Cache Compression with Composite Tokens"):
each KV head keeps its own best tokens, but every head of a layer keeps the same number, so a layer's cache stays
one dense (Hkv, n_l, D) tensor; and the n_l are allocated across layers by one global ranking.

Composite token r of layer l = the r-th best token of every head of l, scored by the mean over heads of their r-th
best (aggregated attention) scores; one top-k over the composite tokens of every layer (K = layers x budget per row)
gives each layer its n_l (``cache/policy/global_budget.py``, ``granularity=composite``). Scores are the scorer's
(default H2O's accumulated attention over the prompt, the paper's aggregation), each layer's normalised to shares
of its total (``normalize=share``) before ranking. Two settings of kvpress 0.5.5's KVComposePress, both on by
default: ``head_mean``, each head's score of a token plus the mean over the layer's heads of theirs
(s'_h = s_h + mean_h' s_h', a stabiliser), and ``first_layer_max``, the first layer's composite scores are the max
over every layer's at the same rank, so it keeps the most tokens.
Departure: the paper aggregates attention with its own query statistics; any scorer here (kvpress's is the
bare-replay attention, max over queries, mean over a KV head's query heads: ``policy/scorer=kvzip
policy.scorer.group=mean +policy.scorer.repeat=null policy.normalize=none``).
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.global_budget import GlobalBudget
from kvcompress.cache.policy.score import Candidates


class KVCompose(GlobalBudget):
    """Composite tokens (equal counts across a layer's heads, ragged across layers) under one global budget."""

    def __init__(self, scorer: EvictionPolicy | None = None, scope: str = "global", granularity: str = "composite",
                 floor: float = 0.0, normalize: str = "share", head_mean: bool = True, first_layer_max: bool = True,
                 **kwargs):
        self.head_mean = bool(head_mean)
        super().__init__(scorer, scope=scope, granularity=granularity, floor=floor, normalize=normalize, **kwargs)
        self.first_layer_max = bool(first_layer_max)

    def score(self, c: Candidates) -> Tensor:
        s = super().score(c)
        return s + s.mean(1, keepdim=True) if self.head_mean and s.shape[1] > 1 else s
