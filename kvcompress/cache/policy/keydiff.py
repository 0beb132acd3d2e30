"""KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference"):
keep the keys least similar to the others, which the paper ties to high attention; no attention weights needed,
so it runs with fused attention kernels.

Per KV head, the anchor is the mean of the held keys' unit vectors, a = mean_i k_i / ||k_i||, and
    score_i = -cos(k_i, a) = -(k_i . a) / (||k_i|| ||a||)      (higher = more distinct = keep).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates


class KeyDiff(EvictionPolicy):
    """Score = minus the cosine similarity of each key to its head's mean unit key (padding excluded)."""

    captured = True

    def score(self, c: Candidates) -> Tensor:
        k = c.keys().float()  # (B, H, T, D)
        real = (c.pos < PAD_POSITION).float()[..., None]  # (B, 1|H, T, 1)
        unit = F.normalize(k, dim=-1) * real
        anchor = unit.sum(2, keepdim=True) / real.sum(2, keepdim=True).clamp_min(1.0)
        return -F.cosine_similarity(k, anchor, dim=-1)
