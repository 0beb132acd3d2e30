"""AdaKV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation"): one top-k over
the scores of *all* KV heads of a store, so heads whose attention is spread keep more tokens and peaked heads fewer.

With per-head scores s[h, i] (any scorer, ``policy/scorer=``), a store's budget B per head and H KV heads:

    safeguard   every head first keeps its own top floor(alpha * B) tokens (the paper's alpha = 0.2),
    selection   the rest of the H * B slots go to the largest s[h, i] over every (h, i) of the row,

so each row keeps exactly H * B tokens, head h keeping B_h of them (sum_h B_h = H * B). Sinks, the recent window
and the step's new tokens are protected in every head.

Memory: a store's slot view has one slot count, so every head shows max_h B_h slots, the max_h B_h - B_h extra
slots of a head invisible (``keep_per_head``: ``store.hide``). A codec storage (dense, int, fp8, ...) then moves
into pages (``cache.pages``): it holds each head's B_h tokens rounded up to pages plus a page table, so memory is
the budget. Storages that are not codecs (KIVI, GEAR, KVQuant, latent) hold the padded view, a factor
H * max_h B_h / (H * B) over the budget (worst case max_h B_h = H * B - (H - 1) * alpha * B). Either way
``padding_fraction`` reports the view's padding share (padding slots / all slots, at the last eviction), and
``paged_fraction`` the share of stores held in pages.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.checks import number_in
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.wrapper import PaddingReport, ScorerWrapper, UnevenHeads, lift_top
from kvcompress.cache.storage.base import TokenStore


class AdaKV(PaddingReport, ScorerWrapper, UnevenHeads):
    """Head-adaptive budgets over any scorer's per-head scores (``scorer``; the YAML default is SnapKV)."""

    def __init__(self, scorer: EvictionPolicy | None = None, alpha: float = 0.2, **kwargs):
        self.alpha = number_in("policy.alpha", alpha, 0.0, 1.0)
        super().__init__(scorer, **kwargs)

    def evict(self, owner: int, store: TokenStore, protect: int = 0) -> None:
        held, budget = store.length, self.target(owner)
        if held <= budget:
            return
        heads, pos = self.spec.num_kv_heads, self.head_positions(store)
        score = self.score(self.candidates(owner, store, pos)).expand(-1, heads, -1)
        # the safeguard: each head's top floor(alpha * budget) are lifted above the shared ranking too
        prio = lift_top(self.priority(score, pos, budget, protect), pos, int(self.alpha * budget))
        keep = torch.zeros_like(prio, dtype=torch.bool)
        best = top_slots(prio, pos, min(heads * budget, prio[0].numel()))
        keep.view(keep.shape[0], -1).scatter_(1, best, True)
        keep &= pos < PAD_POSITION
        self.keep_heads(owner, store, keep)
        self.note_padding(owner, store, keep)


def top_slots(prio: Tensor, pos: Tensor, k: int) -> Tensor:
    """Per row, the flat (head * T + slot) indices of the k best entries of ``prio`` (B, H, T); ties go to the later
    position, then the lower head, so the choice never depends on slot layout (another row's padding)."""
    h = prio.shape[1]
    tie = (pos.long() * h + (h - 1 - torch.arange(h, device=pos.device))[:, None]).flatten(1)
    first = torch.argsort(tie, dim=1, descending=True, stable=True)
    second = torch.argsort(prio.flatten(1).gather(1, first), dim=1, descending=True, stable=True)
    return first.gather(1, second[:, :k])
