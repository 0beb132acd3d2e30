"""Token eviction over any storage: which tokens a layer keeps, never how they are stored.

``EvictingCache`` is a ``LayeredCache`` whose ``attend`` runs the attention (with softmax weights
for the trailing queries a policy asks for, in the same pass), lets the policy observe them, then
evicts down to the budget. A policy is a subclass that scores the held tokens (higher = keep).

* Budget: a token count (int >= 1) or a fraction in (0, 1] of the tokens seen by the row.
* Protected tokens: ``sinks`` (the lowest positions held) and ``recent`` (the highest; an int,
  or a float fraction of the budget). Everything else competes on the policy's score.
* When: ``decode`` evicts after every forward step (chunked prefill steps included) once a layer
  holds more than budget + ``slack``; ``prefill`` compresses once when prefill ends (the first
  single-token step after multi-token steps), before that step attends, and then lets decode grow;
  ``both`` keeps the whole prompt during prefill, compresses at its end, then evicts during decode.
* ``per_head``: each KV head keeps its own tokens (positions become (B, Hkv, T)).

Positions are never renumbered: kept tokens keep their original positions (RoPE stays right),
batch rows select independently, and ``keep(idx)`` of the storage does the gathering.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, ModelSpec, Rotary, attention, attention_with_weights
from kvcompress.cache.layered import KeyMode, LayeredCache
from kvcompress.cache.store import TokenStore

When = Literal["prefill", "decode", "both"]
WHEN = ("prefill", "decode", "both")


def check_budget(budget: int | float, sinks: int, recent: int | float) -> None:
    """ValueErrors naming the setting and its valid range (runs in the constructor)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a token count >= 1 or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget as a fraction must be in (0, 1], got {budget!r} (use an int for a token count)")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget must be a token count >= 1 or a fraction in (0, 1], got {budget!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if isinstance(budget, int) and sinks >= budget:
        raise ValueError(f"sinks must be < budget ({budget}), got {sinks!r}")
    if isinstance(recent, float):
        if not 0.0 <= recent <= 1.0:
            raise ValueError(f"recent as a fraction of the budget must be in [0, 1], got {recent!r}")
    elif isinstance(recent, bool) or not isinstance(recent, int) or recent < 0:
        raise ValueError(f"recent must be an int >= 0 or a fraction in [0, 1], got {recent!r}")
    elif isinstance(budget, int) and sinks + recent > budget:
        raise ValueError(f"sinks + recent must be <= budget ({budget}), got {sinks} + {recent}")


def take(state: Tensor, idx: Tensor) -> Tensor:
    """Gather a policy's per-token state (B, H', ..., T) with keep indices (B, K) or (B, Hkv, K)."""
    if idx.dim() == 2:
        idx = idx[:, None]
    heads = max(state.shape[1], idx.shape[1])
    state = state.expand(state.shape[0], heads, *state.shape[2:])
    mid = state.shape[2:-1]
    idx = idx.reshape(idx.shape[0], idx.shape[1], *([1] * len(mid)), idx.shape[-1])
    return state.gather(-1, idx.expand(state.shape[0], heads, *mid, idx.shape[-1]))


def fit(state: Tensor | None, length: int) -> Tensor | None:
    """Pad a per-token state with zeros up to ``length`` tokens (new tokens have no score yet)."""
    if state is None or state.shape[-1] >= length:
        return state
    return torch.nn.functional.pad(state, (0, length - state.shape[-1]))


class EvictingCache(LayeredCache):
    """Base of every eviction policy. Subclasses implement ``score`` and, if they need attention
    weights, ``queries_needed`` and ``observe``.
    """

    def __init__(self, budget: int | float = 512, sinks: int = 0, recent: int | float = 0,
                 when: When = "decode", slack: int = 0, per_head: bool = False,
                 storage: str = "dense", storage_params: dict | None = None, keys: KeyMode = "post_rope"):
        check_budget(budget, sinks, recent)
        if when not in WHEN:
            raise ValueError(f"when must be one of {', '.join(WHEN)}, got {when!r}")
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be an int >= 0, got {slack!r}")
        self.budget, self.sinks, self.recent = budget, sinks, recent
        self.when, self.slack, self.per_head = when, slack, bool(per_head)
        super().__init__(storage=storage, storage_params=storage_params, keys=keys)

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, spec: ModelSpec) -> None:
        super().setup(spec)
        if self.per_head and spec.num_kv_heads > 1:
            self._check_per_head_keep(spec)

    def _check_per_head_keep(self, spec: ModelSpec) -> None:
        store = self.new_store()
        k = torch.zeros(1, spec.num_kv_heads, 2, spec.head_dim)
        try:
            store.append(k, k, torch.arange(2)[None])
            store.keep(torch.zeros(1, spec.num_kv_heads, 1, dtype=torch.long))
        except Exception as e:
            raise ValueError(f"per_head=true needs a storage with per-head keep; storage {self.storage!r} "
                             f"failed: {type(e).__name__}: {e}") from e

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self.row_seen = torch.zeros(batch_size, dtype=torch.long)
        self._last_step, self._prefill_end = 0, False
        self._compressed = [False] * self.spec.num_layers
        self.evictions = 0
        self.reset_policy()

    def reset_policy(self) -> None:
        """Drop per-token policy state at the start of a batch: ``state[layer]`` is (B, H', ..., T)."""
        self.state: list[Tensor | None] = [None] * self.spec.num_layers

    # -- budgets -----------------------------------------------------------------------------
    def row_budget(self) -> int:
        """The budget of the fullest row: a token count, or the fraction of its tokens seen."""
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * int(self.row_seen.max())))
        return self.budget

    def layer_budget(self, layer: int, budget: int) -> int:
        """Per-layer schedule (PyramidKV); by default every layer gets the same budget."""
        return budget

    def recent_tokens(self, budget: int) -> int:
        return int(self.recent * budget) if isinstance(self.recent, float) else self.recent

    # -- the engine's calls ------------------------------------------------------------------
    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        if layer == 0:
            steps = k.shape[2]
            self._prefill_end = steps == 1 and self._last_step > 1
            self._last_step = steps
            self.row_seen = self.row_seen.to(pos.device) + (pos < PAD_POSITION).sum(1)
        super().append(layer, k, v, pos, rope)

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        steps = q.shape[2]
        if self._prefill_end and self.when != "decode" and not self._compressed[layer]:
            self._compressed[layer] = True
            self.evict(layer, protect=steps)
            if self.when == "prefill":
                self.drop_state(layer)
        k, v, pos = self.read(layer)
        q = self.query_for(layer, q, q_pos, k.shape[2])
        n = self.queries_needed(layer, steps) if self.may_evict_later(layer) else 0
        out, weights = self._attention(q, k.to(q.dtype), v.to(q.dtype), q_pos, pos, n)
        if weights is not None:
            live = (q_pos[:, -n:] < PAD_POSITION)[:, None, :, None]
            self.observe(layer, weights * live, pos)
        if self._evicts_now(steps) and self.store_for(layer).length > self._target(layer) + self.slack:
            self.evict(layer)
        return out

    def query_for(self, layer: int, q: Tensor, q_pos: Tensor, held: int) -> Tensor:
        """Hook to re-rotate queries (StreamingLLM's optional position shift). Default: as given."""
        return q

    @staticmethod
    def _attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, pos: Tensor, n: int):
        """One attention pass; the softmax weights of the last ``n`` queries come out of the same pass."""
        steps = q.shape[2]
        if n <= 0:
            return attention(q, k, v, q_pos, pos), None
        if n >= steps:
            return attention_with_weights(q, k, v, q_pos, pos)
        head = attention(q[:, :, :-n], k, v, q_pos[:, :-n], pos)
        tail, weights = attention_with_weights(q[:, :, -n:], k, v, q_pos[:, -n:], pos)
        return torch.cat([head, tail], 2), weights

    def _evicts_now(self, steps: int) -> bool:
        return self.when == "decode" or (self.when == "both" and steps == 1)

    def may_evict_later(self, layer: int) -> bool:
        return not (self.when == "prefill" and self._compressed[layer])

    def _target(self, layer: int) -> int:
        return self.layer_budget(layer, self.row_budget())

    # -- eviction ----------------------------------------------------------------------------
    def evict(self, layer: int, protect: int = 0) -> None:
        """Keep ``layer``'s best tokens within its budget; the last ``protect`` slots always stay."""
        store = self.store_for(layer)
        held, budget = store.length, self._target(layer)
        if held <= budget:
            return
        pos = store.positions()
        if pos.dim() == 2:
            pos = pos[:, None]
        score = self.score(layer, store, pos)
        if self.per_head and score.shape[1] == 1:
            score = score.expand(-1, self.spec.num_kv_heads, -1)
        if not self.per_head and score.shape[1] > 1:
            score = score.mean(1, keepdim=True)
        if score.shape[1] > pos.shape[1]:
            pos = pos.expand(-1, score.shape[1], -1)
        prio = self.priority(score, pos, budget, protect)
        idx = prio.topk(budget, dim=-1).indices.sort(-1).values
        if idx.shape[1] == 1:
            idx = idx[:, 0]
        store.keep(idx)
        self.on_keep(layer, idx, held)
        self.evictions += 1

    def priority(self, score: Tensor, pos: Tensor, budget: int, protect: int) -> Tensor:
        """Score with sinks, the recent window and protected slots lifted to +inf, padding to -inf."""
        real = pos < PAD_POSITION
        prio = score.float().nan_to_num(0.0, 0.0, 0.0).masked_fill(~real, float("-inf"))
        lifted = torch.zeros_like(real)
        n_new = min(protect, budget)
        if n_new:
            lifted[..., -n_new:] = True
        n_sinks = min(self.sinks, budget - n_new)
        n_recent = min(max(self.recent_tokens(budget), n_new), budget - n_sinks)
        key = pos.long()
        if n_sinks:
            first = torch.where(real, -key, torch.full_like(key, -(2**62))).topk(n_sinks, -1).indices
            lifted.scatter_(-1, first, True)
        if n_recent:
            last = torch.where(real, key, torch.full_like(key, -(2**62))).topk(n_recent, -1).indices
            lifted.scatter_(-1, last, True)
        return prio.masked_fill(lifted & real, float("inf"))

    # -- the policy ---------------------------------------------------------------------------
    def score(self, layer: int, store: TokenStore, pos: Tensor) -> Tensor:
        """(B, 1 or Hkv, T) importance of every held token, higher = keep. ``pos`` is (B, 1|Hkv, T)."""
        raise NotImplementedError

    def queries_needed(self, layer: int, steps: int) -> int:
        """How many trailing queries of this step the policy needs softmax weights for."""
        return 0

    def observe(self, layer: int, weights: Tensor, pos: Tensor) -> None:
        """Softmax weights (B, Hq, n, T) of the last n queries over every held token."""

    def on_keep(self, layer: int, idx: Tensor, held: int) -> None:
        """Gather the policy's per-token state with the indices the store kept (of ``held`` slots)."""
        if self.state[layer] is not None:
            self.state[layer] = take(fit(self.state[layer], held), idx)

    def drop_state(self, layer: int) -> None:
        """Free ``layer``'s policy state once no eviction can follow (``when=prefill``)."""
        self.state[layer] = None

    def policy_tensors(self) -> list[Tensor]:
        """Per-token state the policy holds (counted in ``kv_bytes``: it is real memory)."""
        return [t for t in self.state if t is not None]

    def group_weights(self, weights: Tensor) -> Tensor:
        """(B, Hq, n, T) -> (B, Hkv, n, T) per KV head, or (B, 1, n, T) when heads share a selection."""
        b, hq, n, t = weights.shape
        hkv = self.spec.num_kv_heads if self.per_head else 1
        return weights.float().view(b, hkv, hq // hkv, n, t).sum(2)

    # -- accounting ---------------------------------------------------------------------------
    def tensors(self) -> Iterable[Tensor]:
        return [*super().tensors(), *self.policy_tensors()]

    def tokens_held(self) -> list[int]:
        return [s.length for s in self.stores]

    def memory_report(self) -> dict[str, float]:
        report = super().memory_report()
        held = self.tokens_held()
        if held:
            report["tokens_held_mean"] = sum(held) / len(held)
            report["tokens_held_max"] = max(held)
        report["policy_bytes"] = sum(t.nbytes for t in self.policy_tensors())
        report["evictions"] = self.evictions  # since reset: 0 means this run measured the full cache
        return report
