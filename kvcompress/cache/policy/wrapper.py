"""Shared parts of the policies that wrap a scorer (AdaKV, ChunkKV) and of those that keep a different number of
tokens per KV head (AdaKV, DuoAttention: ``UnevenHeads``).

The scorer is any eviction policy, built by Hydra from a nested node (``scorer: {_target_: ...}``, or the group
``conf/policy/scorer/``: ``policy/scorer=h2o``). The wrapper owns budgets, protection, timing and the per-token
state; it calls the scorer's two functions (``update``, ``score``) with that state and its own selection groups,
and never writes to the scorer (a scorer instance can serve several wrappers). The scorer's own eviction settings
(budget, when, per_head) are unused.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, ModelSpec
from kvcompress.cache.buffers import fit, take
from kvcompress.cache.checks import fail
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.storage.base import TokenStore


def keep_per_head(store: TokenStore, keep: Tensor, state: Tensor | None = None) -> Tensor | None:
    """Keep the slots where ``keep`` (B, Hkv, T) holds; heads may keep different counts. The store holds
    max-count slots per head; a head's extra slots (copies of evicted tokens) come *first* and get an invisible
    position, so the kept tokens stay contiguous with the tokens appended later (slot neighbourhoods, SnapKV's
    pooling, do not depend on another row's padding). They are real memory (``kv_bytes`` counts them). Returns the
    policy's per-token ``state`` gathered alike, zero on the padding slots."""
    if not store.pads_heads:
        raise ValueError(f"{type(store).__name__} cannot hold a different number of tokens per KV head "
                         "(layout=minicache re-packs a pair's parts); use layout=per_layer or cla with this policy")
    count = int(keep.sum(-1).max())
    idx = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[..., keep.shape[-1] - count:]
    valid = torch.gather(keep, -1, idx)
    store.keep(idx)
    store.hide(valid)
    return kept_state(state, keep.shape[-1], idx, valid)


def kept_state(state: Tensor | None, length: int, idx: Tensor, valid: Tensor) -> Tensor | None:
    """Per-token ``state`` of a store that held ``length`` slots, gathered at the kept slots ``idx`` (B, [G,] K) and
    zeroed where ``valid`` (alike) is False (padding slots)."""
    if state is None:
        return None
    state = take(fit(state, length), idx)
    v = valid if valid.dim() == 3 else valid[:, None]
    return state * v.view(*v.shape[:2], *[1] * (state.dim() - 3), -1).to(state.dtype)


def lift_top(prio: Tensor, pos: Tensor, n: int) -> Tensor:
    """``prio`` (B, G, T) with each group's top ``n`` real slots (at ``pos``) lifted to +inf, kept whatever else
    scores (AdaKV's safeguard, a global budget's floor)."""
    n = min(n, prio.shape[-1])
    if not n:
        return prio
    top = prio.topk(n, dim=-1).indices
    lifted = torch.zeros_like(prio, dtype=torch.bool).scatter_(-1, top, True) & (pos < PAD_POSITION)
    return prio.masked_fill(lifted, float("inf"))


class PaddingReport:
    """Mixin (before an ``EvictionPolicy`` base): ``padding_fraction``, the share of invisible padding slots in the
    stores' slot views at their last eviction."""

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.padding: dict[int, tuple[int, int]] = {}

    def note_padding(self, owner: int, store: TokenStore, keep: Tensor) -> None:
        """After ``store`` kept the slots where ``keep`` (B, G, T) held: its padding slots, all its slots."""
        slots = store.length * keep.shape[0] * keep.shape[1]
        self.padding[owner] = (slots - int(keep.sum()), slots)

    def report(self) -> dict[str, float]:
        pad, slots = (sum(x) for x in zip(*self.padding.values(), strict=True)) if self.padding else (0, 0)
        return {**super().report(), **({"padding_fraction": pad / slots} if slots else {})}


class UnevenHeads(EvictionPolicy):
    """Base of the policies whose KV heads keep different token counts (AdaKV, DuoAttention): always ``per_head``;
    ``paged_fraction`` is the share of stores that held their heads in pages (no padding) at their last eviction."""

    uneven_heads = True

    def __init__(self, *args, per_head: bool = True, **kwargs):
        if per_head is not True:
            fail("policy.per_head", f"true for {type(self).__name__} (its KV heads keep different tokens)", per_head)
        super().__init__(*args, per_head=True, **kwargs)

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.paged: dict[int, bool] = {}

    def head_positions(self, store: TokenStore) -> Tensor:
        """The store's positions per KV head (B, Hkv, T)."""
        pos = store.positions()
        return (pos[:, None] if pos.dim() == 2 else pos).expand(-1, self.spec.num_kv_heads, -1)

    def keep_heads(self, owner: int, store: TokenStore, keep: Tensor) -> None:
        self.state[owner] = keep_per_head(store, keep, self.state[owner])
        self.paged[owner] = store.paged
        self.evictions += 1

    def report(self) -> dict[str, float]:
        paged = {"paged_fraction": sum(self.paged.values()) / len(self.paged)} if self.paged else {}
        return {**super().report(), **paged}


class ScorerWrapper(EvictionPolicy):
    """An eviction policy whose token scores come from another policy (``scorer``)."""

    def __init__(self, scorer: EvictionPolicy | None = None, **kwargs):
        if not isinstance(scorer, EvictionPolicy):
            raise ValueError("policy.scorer must be a scoring policy (a node with _target_: "
                             "kvcompress.cache.policy.<module>.<Class>, e.g. policy/scorer=snapkv on the command "
                             f"line), got {scorer!r}")
        self.scorer = scorer
        super().__init__(**kwargs)

    @property
    def wants_queries(self) -> bool:
        return self.scorer.wants_queries

    @property
    def replays(self) -> bool:
        return self.scorer.replays

    def check(self, spec: ModelSpec, storage: TokenStore) -> None:
        self.scorer.check(spec, storage)  # its own settings as given (the wrapper's are checked below)
        super().check(spec, storage)

    def calibrate(self, ctx, cache_for=None) -> None:
        self.scorer.calibrate(ctx, cache_for)

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.scorer.reset(batch_size, owners)  # the scorer's own statistics (query moments, a generator)

    def start_step(self, steps: int, pos: Tensor) -> None:
        super().start_step(steps, pos)
        self.scorer.start_step(steps, pos)

    def replay_prefix(self) -> list[int]:
        return self.scorer.replay_prefix()

    def start_replay(self) -> None:
        super().start_replay()
        self.scorer.start_replay()

    def queries_needed(self, owner: int, steps: int) -> int:
        return self.scorer.queries_needed(owner, steps)

    def update(self, weights: Tensor, state: Tensor | None, heads: int) -> Tensor | None:
        return self.scorer.update(weights, state, heads)

    def update_queries(self, owner: int, q: Tensor, q_pos: Tensor, rope) -> None:
        self.scorer.update_queries(owner, q, q_pos, rope)

    def score(self, c: Candidates) -> Tensor:
        return self.scorer.score(c)

    def tensors(self) -> list[Tensor]:
        return super().tensors() + self.scorer.tensors()  # the scorer's statistics (its own state stays empty)
