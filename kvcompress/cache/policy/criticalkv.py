"""CriticalKV (Feng et al., 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective"): a value-aware correction of any scorer. Evicting token i perturbs the attention output by about
a_i W_o v_i, so its importance is its attention times the size of its projected value, not the attention alone.

With s_i any scorer's score (``scorer``) and B the store's budget, as the paper's two-stage selection:

    stage 1   the top floor(first_stage x B) tokens by s are kept (lifted above every other score)
    stage 2   the rest rank by  (s_i + epsilon) x ||v_i||_1

Departure: the paper (and kvpress's CriticalKVPress) uses ||W_o^h v_i||_1, the value projected by the head's
slice of the output projection; a policy never sees model weights, so ||v_i||_1 stands in for it (the bound
||W_o^h v||_1 <= ||W_o^h||_1 ||v||_1, one constant per head: exact in the ranking within a head, approximate
across the heads a shared selection averages).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.checks import number_in
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.policy.wrapper import ScorerWrapper


class CriticalKV(ScorerWrapper):
    """Any scorer's scores times the L1 norm of each token's value, after a first stage kept by the scores alone."""

    def __init__(self, scorer: EvictionPolicy | None = None, first_stage: float = 0.5, epsilon: float = 1e-4,
                 **kwargs):
        self.first_stage = number_in("policy.first_stage", first_stage, 0.0, 1.0)
        self.epsilon = number_in("policy.epsilon", epsilon, 0.0, 1.0)
        super().__init__(scorer, **kwargs)

    def score(self, c: Candidates) -> Tensor:
        return critical_scores(self.scorer.score(c).float(), c.values().float(), c.pos,
                               int(self.first_stage * self.target(c.owner)), self.epsilon)


def critical_scores(s: Tensor, v: Tensor, pos: Tensor, n_first: int, epsilon: float) -> Tensor:
    """(B, G, T) scores, values (B, Hkv, T, D) -> (s + epsilon) ||v||_1 with each group's top ``n_first`` by ``s``
    lifted above all (in their own order); heads averaged where a group spans several."""
    norm = v.abs().sum(-1)
    if s.shape[1] != norm.shape[1]:
        norm = norm.mean(1, keepdim=True)
    s = s.expand(-1, max(s.shape[1], norm.shape[1]), -1)
    real = (pos < PAD_POSITION).expand_as(s)
    out = (s + epsilon) * norm
    n_first = min(n_first, s.shape[-1])
    if n_first:
        top = s.masked_fill(~real, float("-inf")).topk(n_first, dim=-1).indices
        first = torch.zeros_like(real).scatter_(-1, top, True) & real
        lift = out.masked_fill(~real, 0).amax() - s.masked_fill(~real, 0).amin() + 1  # above every stage-2 score
        out = torch.where(first, s + lift, out)
    return out
