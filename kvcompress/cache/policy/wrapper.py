"""Shared parts of the policies that wrap a scorer (AdaKV, ChunkKV) and of those that keep a different number of
tokens per KV head (AdaKV, DuoAttention).

The scorer is any eviction policy, built by Hydra from a nested node (``scorer: {_target_: ...}``, or the group
``conf/policy/scorer/``: ``policy/scorer=h2o``); the wrapper owns budgets, protection and timing, the scorer
only observes and scores. Both share one per-token state dict, so eviction, ``remap`` and ``when=prefill``'s
freeing act on the scorer's state too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.buffers import fit, take
from kvcompress.cache.policy.base import EvictionPolicy
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
    if state is None:
        return None
    state = take(fit(state, keep.shape[-1]), idx)
    return state * valid.view(*valid.shape[:2], *[1] * (state.dim() - 3), valid.shape[-1]).to(state.dtype)


class ScorerWrapper(EvictionPolicy):
    """An eviction policy whose token scores come from another policy (``scorer``)."""

    scorer_per_head: bool | None = None  # force the scorer's per_head (None: follow the wrapper's)

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

    def check(self, spec: ModelSpec, storage: TokenStore) -> None:
        self.scorer.per_head = self.per_head if self.scorer_per_head is None else self.scorer_per_head
        self.scorer.rerotate = self.rerotate
        self.scorer.check(spec, storage)
        super().check(spec, storage)

    def calibrate(self, ctx) -> None:
        self.scorer.calibrate(ctx)

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.scorer.reset(batch_size, owners)
        self.scorer.state = self.state  # one per-token state: eviction and remap move the scorer's along

    def start_step(self, steps: int, pos: Tensor) -> None:
        super().start_step(steps, pos)
        self.scorer.row_seen = self.row_seen

    def queries_needed(self, owner: int, steps: int) -> int:
        return self.scorer.queries_needed(owner, steps)

    def observe(self, owner: int, weights: Tensor, pos: Tensor) -> None:
        self.scorer.observe(owner, weights, pos)

    def observe_queries(self, owner: int, q: Tensor, q_pos: Tensor, rope) -> None:
        self.scorer.observe_queries(owner, q, q_pos, rope)

    def replay_wanted(self) -> bool:
        return (self.when != "decode" and getattr(self.scorer, "replays", False)
                and not any(self.compressed.values()))

    def start_replay(self) -> None:
        self.scorer.start_replay()

    def score(self, owner: int, store: TokenStore, pos: Tensor) -> Tensor:
        return self.scorer.score(owner, store, pos)

    def tensors(self) -> list[Tensor]:
        return self.scorer.tensors()
