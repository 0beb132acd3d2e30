"""One budget across layers and KV heads: each (layer, head) keeps what its scores earn in one ranking per row.

Entries e = (store l, group g, token i) with a score s_l[g, i] (any scorer's; g is a KV head, or the store's one
shared selection). Per row, with B_l the store's budget (``policy.budget``: the mean per store, and per head) and
G groups per store:

    normalise   ``none``:  s as is (KVzip's max softmax weight lies in [0, 1] in every layer: comparable by
                           construction);  ``share``: s'_l = (s_l - min s_l) / sum_{g,i} (s_l - min s_l), each
                           store's scores as shares of its own total (attention mass is 1 per query in every layer,
                           and a score that is no mass, a key norm, is shifted to >= 0 first)
    protect     sinks, the recent window and this step's tokens (every group), and each group's own top
                floor(floor * B_l) (``floor``), are kept first
    rank        the rest of the row's total  K = G * sum_l B_l  goes to the largest s' over every (l, g, i)
                (``scope=global``); ``scope=layerwise`` ranks within each store (K_l = G * B_l, AdaKV without
                the safeguard when ``floor=0``); ``scope=layer`` is the store's own keep rule (no ranking here)

Granularity (what an entry is): ``head``, each (layer, head) keeps its own count; ``layer``, the heads of a store
share one selection (scores averaged over heads) and each store keeps its own count; ``composite`` (KVCompose,
Akulov et al., 2025): every head of a store keeps the same count n_l, head h its own top n_l tokens, and the
ranked entry is the composite token r = (the r-th best token of every head), scored by the mean over heads of
their r-th best scores, so a store's allocation is ragged across layers but even across its heads.

Memory: a store holds one slot count per row and head. ``layer`` and ``composite`` need no padding for one row
(each store's count is its own); rows of a batch that earn different counts, and the heads of ``head``
granularity, are padded to the fullest row / head with invisible slots (``hide``), counted in ``kv_bytes`` and
reported as ``padding_fraction`` (the paged buffer that would hold them without padding has not landed). So
``head`` and ``composite`` declare ``uneven_heads`` (a storage that pads heads; not a MiniCache pair).
A store shared by several layers (CLA, MiniCache) is one store in the ranking: one budget B_l, the summed scores
of its readers.

When: a ranking needs every store's scores before any store evicts, and stores evict one by one after their last
reader. ``prefill`` (and ``both``): at the first step after ``end_prompt`` (the engine's explicit boundary), the
first store's ``before_attend`` ranks every store's prompt tokens once and evicts all of them (the others are not
read again before they attend in this step). ``decode`` (and ``both`` after the prompt): after the last store's
last reader attended in a step, if a row holds more than K (+ ``slack`` per store and group), every store is
ranked and evicted at once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.buffers import pick_rows
from kvcompress.cache.checks import number_in, one_of
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.wrapper import PaddingReport, ScorerWrapper, keep_per_head, kept_state, lift_top
from kvcompress.cache.storage.base import TokenStore

SCOPES = ("global", "layerwise", "layer")
GRANULARITIES = ("head", "layer", "composite")
NORMALISATIONS = ("none", "share")


class GlobalRanking(PaddingReport):
    """Mixin (before an ``EvictionPolicy`` base): the ranking above, active unless ``scope=layer``."""

    uneven_heads = True  # the class may keep uneven heads (what is declared); an instance says whether its settings do
    first_layer_max = False  # composite: the first store's composite scores are the max over every store's (KVCompose)

    def init_ranking(self, scope: str, granularity: str, floor: float, normalize: str) -> bool:
        """Validate the settings; returns whether heads keep their own tokens (the base's ``per_head``)."""
        self.scope = one_of("policy.scope", scope, SCOPES)
        self.granularity = one_of("policy.granularity", granularity, GRANULARITIES)
        self.floor = number_in("policy.floor", floor, 0.0, 1.0)
        self.normalize = one_of("policy.normalize", normalize, NORMALISATIONS)
        self.ranked = self.scope != "layer"
        # heads (head) or rows of a batch (composite) keep different counts: a storage that pads heads
        self.uneven_heads = self.ranked and self.granularity != "layer"
        return self.uneven_heads

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.stores: dict[int, TokenStore] = {}

    # -- timing ------------------------------------------------------------------------------------
    def before_attend(self, owner: int, store: TokenStore, steps: int) -> None:
        if not self.ranked:
            return super().before_attend(owner, store, steps)
        self.stores[owner] = store
        if self.compresses_prompt(owner):
            self.compressed = dict.fromkeys(self.compressed, True)
            if len(self.stores) == len(self.compressed) and self.over_budget(0):
                self.evict_all({owner: steps})
            if self.when == "prefill":
                self.state = {o: None for o in self.state}  # no eviction can follow: free the state

    def after_attend(self, owner: int, store: TokenStore, steps: int) -> None:
        if not self.ranked:
            return super().after_attend(owner, store, steps)
        self.stores[owner] = store
        self.held[owner] = store.length
        last = owner == max(self.compressed) and len(self.stores) == len(self.compressed)
        if self.evicts_each_step() and last and self.over_budget(self.slack):
            self.evict_all({})

    # -- budgets -----------------------------------------------------------------------------------
    def groups(self) -> int:
        """Entries per token of a store: its KV heads (``head``), else one (a shared or composite token)."""
        return self.spec.num_kv_heads if self.granularity == "head" else 1

    def total_budget(self, owners: list[int]) -> int:
        return self.groups() * sum(self.target(o) for o in owners)

    def over_budget(self, slack: int) -> bool:
        """A row holds more than the total budget plus ``slack`` entries per store and group."""
        extra = slack * len(self.stores) * self.groups()
        return bool((self.units_held() > self.total_budget(list(self.stores)) + extra).any())

    def units_held(self) -> Tensor:
        """(B,) entries each row holds over every store (real tokens; a composite token counts once)."""
        total = 0
        for store in self.stores.values():
            n = (store.positions() < PAD_POSITION).sum(-1)
            if n.dim() == 1:  # heads share the store's positions
                total = total + n * self.groups()
            else:
                total = total + (n.sum(-1) if self.granularity == "head" else n.amax(-1))
        return total

    # -- the ranking -------------------------------------------------------------------------------
    def entry_scores(self, owner: int, protect: int) -> tuple[Tensor, Tensor]:
        """The store's priorities (B, G', T) (normalised; protected and floor +inf, padding -inf) and positions."""
        store = self.stores[owner]
        pos = store.positions()
        pos = pos[:, None] if pos.dim() == 2 else pos
        heads = self.heads()
        pos = pos.expand(-1, max(heads, pos.shape[1]), -1)
        score = self.score(self.candidates(owner, store, pos)).float()
        if heads == 1 and score.shape[1] > 1:
            score = score.mean(1, keepdim=True)
        score = normalised(score.expand(-1, pos.shape[1], -1), pos < PAD_POSITION, self.normalize)
        budget = self.target(owner)
        # each group's own best floor(floor * B) are kept whatever the other stores score
        return lift_top(self.priority(score, pos, budget, protect), pos, int(self.floor * budget)), pos

    def evict_all(self, protect: dict[int, int]) -> None:
        """Rank and evict every store (``protect``: the last slots of a store that this step appended to)."""
        owners = sorted(self.stores)
        prios = {o: self.entry_scores(o, protect.get(o, 0)) for o in owners}
        for group in ([owners] if self.scope == "global" else [[o] for o in owners]):
            entries = [composite(prios[o][0]) if self.granularity == "composite" else prios[o][0].flatten(1)
                       for o in group]
            if self.first_layer_max and self.granularity == "composite" and len(group) > 1:
                entries[0] = rank_max(entries)
            chosen = top_entries(torch.cat(entries, dim=1), self.total_budget(group))
            for o, picked in zip(group, chosen.split([e.shape[1] for e in entries], dim=1), strict=True):
                prio, pos = prios[o]
                if self.granularity == "composite":  # each head keeps its own top n_l (n_l composite tokens)
                    n = picked.sum(1)[:, None, None]
                    rank = prio.argsort(dim=-1, descending=True, stable=True).argsort(-1)
                    keep = (rank < n) & (pos < PAD_POSITION)
                else:
                    keep = picked.view(prio.shape)
                self.hold(o, keep)

    def hold(self, owner: int, keep: Tensor) -> None:
        """The store keeps the slots where ``keep`` (B, G', T) holds (slots appended since the ranking stay)."""
        store = self.stores[owner]
        keep = torch.nn.functional.pad(keep, (0, store.length - keep.shape[-1]), value=True)
        keep &= (store.positions() < PAD_POSITION).view(keep.shape[0], -1, keep.shape[-1])
        if self.uneven_heads and keep.shape[1] > 1:  # heads keep different counts: padded per head
            self.state[owner] = keep_per_head(store, keep, self.state[owner])
        else:  # one count per row (and head): rows that earn different counts are padded (pick_rows + hide)
            idx, valid = pick_rows(keep if keep.shape[1] > 1 else keep[:, 0])
            store.keep(idx)
            if not bool(valid.all()):
                store.hide(valid)
            self.state[owner] = kept_state(self.state[owner], keep.shape[-1], idx, valid)
        self.note_padding(owner, store, keep)
        self.held[owner] = store.length
        self.evictions += 1


def normalised(score: Tensor, real: Tensor, how: str) -> Tensor:
    """``share``: per row, each store's scores shifted to >= 0 and divided by their sum over real tokens."""
    if how == "none":
        return score
    s = score.nan_to_num(0.0, 0.0, 0.0)
    low = s.masked_fill(~real, float("inf")).amin((1, 2), keepdim=True).clamp(max=0.0)  # only a negative min shifts
    shifted = (s - low).masked_fill(~real, 0.0)
    return shifted / shifted.sum((1, 2), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def composite(prio: Tensor) -> Tensor:
    """(B, H, T) priorities -> (B, T): the r-th composite token scores the mean of every head's r-th best."""
    ranked = prio.sort(-1, descending=True).values
    return ranked.mean(1).nan_to_num(float("-inf"), float("inf"), float("-inf"))


def rank_max(entries: list[Tensor]) -> Tensor:
    """The first store's (B, T_0) composite scores raised to the max over every store's at the same rank (over the
    ranks all hold; a store holding this step's token has one more)."""
    m = min(e.shape[1] for e in entries)
    top = torch.stack([e[:, :m] for e in entries]).amax(0)
    return torch.cat([top, entries[0][:, m:]], dim=1)


def top_entries(flat: Tensor, k: int) -> Tensor:
    """(B, E) -> bool (B, E): each row's k best real entries, and every protected (+inf) one."""
    real = flat > float("-inf")
    k = min(max(k, int((flat == float("inf")).sum(-1).max())), flat.shape[-1])
    top = flat.topk(k, dim=-1).indices
    return torch.zeros_like(real).scatter_(-1, top, True) & real


class GlobalBudget(GlobalRanking, ScorerWrapper):
    """Any scorer's scores (``scorer``) ranked across every store and KV head under one budget per row."""

    def __init__(self, scorer: EvictionPolicy | None = None, scope: str = "global", granularity: str = "head",
                 floor: float = 0.1, normalize: str = "share", **kwargs):
        kwargs["per_head"] = self.init_ranking(scope, granularity, floor, normalize) or kwargs.get("per_head", False)
        super().__init__(scorer, **kwargs)
