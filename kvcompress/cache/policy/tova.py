"""TOVA (Oren et al., 2024): evict the token the current query attends to least."""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates, group_weights


class TOVA(EvictionPolicy):
    """Score = softmax weight of each row's last real query of the step (summed over the heads sharing a selection).

    In a right-padded batch a short row's last query in a prefill chunk is padding (its weights come zeroed), so
    every query's weights are asked for and each row takes its last real one; a row with none in the step (it ended
    in an earlier chunk) keeps its previous scores. At the end of prefill (``when=prefill|both``) that is the row's
    last prompt query.
    """

    captured = True  # the state: the previous scores, for a row with no real query in the step

    def queries_needed(self, owner: int, steps: int) -> int:
        return steps

    def update(self, weights: Tensor, before: Tensor | None, heads: int) -> Tensor:
        """(B, Hq, n, T) weights, padding queries zeroed -> (B, heads, T): each row's last real query's, else
        ``before`` (or zeros)."""
        w = group_weights(weights, heads)
        real = w.sum(-1) > 0  # (B, G, n)
        steps = torch.arange(1, w.shape[2] + 1, device=w.device)
        last = (real * steps).argmax(-1)  # the last real query (0 when none)
        scores = w.gather(2, last[..., None, None].expand(-1, -1, 1, w.shape[-1]))[:, :, 0]
        if before is None:
            return scores
        return torch.where(real.any(-1, keepdim=True), scores, before.to(scores.dtype).expand_as(scores))

    def score(self, c: Candidates) -> Tensor:
        return c.state if c.state is not None else c.zeros()
