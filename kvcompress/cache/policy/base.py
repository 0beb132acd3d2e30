"""The policy axis: which tokens each store keeps, never how they are stored or which layers read them.

``Policy`` (``policy=none``) keeps everything: the identity. ``EvictionPolicy`` is the base of every
eviction method; a method is one score with fixed shapes (``policy.score``): ``score(candidates)`` (higher =
keep) and, if it scores by attention, ``queries_needed`` and ``update(weights, state, heads)``. The eager path
(``evict``) and the captured one (``cache.policy.captured``) call the same functions; a method declares what
it is (``captured``, ``uneven_heads``, ``rewrites_values``, ``replays``): nothing is inferred from its code. The
composed cache calls the hooks per store ("owner"): a store read by several layers (a CLA group, a MiniCache
pair) gets the attention weights of all its readers, summed, and is evicted once per step, after its last reader
attended.

* Budget: a token count (int >= 1) or a fraction in (0, 1] of the tokens seen by the row.
* Protected tokens: ``sinks`` (the lowest positions held) and ``recent`` (the highest; an int, or a
  float fraction of the budget). Everything else competes on the policy's score.
* When: ``decode`` evicts after every forward step (chunked prefill steps included) once a store holds
  more than budget + ``slack``; ``prefill`` compresses once when the prompt ends (the evaluation says so:
  ``KVCache.end_prompt``, called by ``engine.session``) before the next step attends, then lets decode
  grow; ``both`` keeps the whole prompt during prefill, compresses at its end, then evicts every step after.
  An evaluation without a prompt (teacher-forced ``eval=ppl``) refuses ``prefill`` and ``both``.
* ``per_head``: each KV head keeps its own tokens (positions become (B, Hkv, T)); needs a storage
  that can hold ragged heads.
* ``rerotate``: positions *within the cache* (StreamingLLM's option): keys are rotated at their slot
  index and queries at the slot after the last key; causality still follows the original positions.
  Needs ``storage.keys=pre_rope``; assumes rows without padding.

Positions are never renumbered: kept tokens keep their positions, batch rows select independently,
and the storage's ``keep(idx)`` does the gathering (memory is really freed).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec
from kvcompress.cache.buffers import fit, follow, take
from kvcompress.cache.checks import fail, int_at_least, is_int, is_number, one_of
from kvcompress.cache.policy.captured import StaticEvictionCache
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.storage.base import TokenStore

WHEN = ("prefill", "decode", "both")
CacheUnder = Callable[["Policy"], KVCache]  # policy -> a dense per-layer cache under it (calibration probes)


class Policy:
    """``policy=none``: keep every token. Every hook is a no-op; the composed cache is then the storage alone.

    Eviction settings given to it (a sweep's shared ``policy.budget``) are ignored, with a note on stderr."""

    rerotate = False

    def __init__(self, **ignored):
        if ignored:
            print(f"policy=none keeps every token; ignoring {', '.join(f'policy.{k}' for k in sorted(ignored))}",
                  file=sys.stderr)

    def check(self, spec: ModelSpec, storage: TokenStore) -> None:
        self.spec = spec

    def calibrate(self, ctx, cache_for: CacheUnder | None = None) -> None:
        """One-off, data-dependent preparation (DuoAttention's head split); ``ctx`` is a CalibrationContext,
        ``cache_for(policy)`` builds a full-precision per-layer cache under a probe policy to measure with (the
        composed cache passes it, as it passes layouts theirs: the policy axis never imports the composed cache)."""

    wants_queries = False  # True: ``observe_queries`` gets the queries of every layer reading a store

    def observe_queries(self, owner: int, q: Tensor, q_pos: Tensor, rope) -> None:
        """Rotated queries (B, Hq, n, D) at ``q_pos`` (B, n) of a layer reading the store (Expected Attention)."""

    def replay_wanted(self) -> bool:
        """True: the engine feeds the prompt once more (KVzip's reconstruction pass) before decoding; the composed
        cache shows the pass to ``observe`` only, then drops its tokens again (``remap``)."""
        return False

    def replay_prefix(self) -> list[int]:
        """Token ids fed before the replayed prompt (``KVCache.replay_prefix``); none by default."""
        return []

    def start_replay(self) -> None:
        """The replay pass begins (no step counting, no before/after_attend until it ends)."""

    def reset(self, batch_size: int, owners: list[int]) -> None:
        pass

    def start_step(self, steps: int, pos: Tensor) -> None:
        """Layer 0 saw ``steps`` new tokens at ``pos`` (B, T)."""

    def end_prompt(self) -> None:
        """The prompt is complete (``KVCache.end_prompt``): prefill-time compression happens at the next step."""

    def acts_at_prompt_end(self) -> bool:
        """True: ``end_prompt`` triggers compression (an evaluation without a prompt must refuse this policy)."""
        return False

    def before_attend(self, owner: int, store: TokenStore, steps: int) -> None:
        """The store's first reader is about to attend (prefill-end compression happens here)."""

    def weights_wanted(self, owner: int, steps: int) -> int:
        """How many trailing queries of this step the policy needs softmax weights for."""
        return 0

    def observe(self, owner: int, weights: Tensor, pos: Tensor) -> None:
        """Softmax weights (B, Hq, n, T) of the last n queries over the store's slots, summed over its readers."""

    def remap(self, owner: int, idx: Tensor) -> None:
        """The store re-ordered its slots (new slot i holds old slot idx[..., i]): move per-token state along."""

    def after_attend(self, owner: int, store: TokenStore, steps: int) -> None:
        """The store's last reader attended (decode-time eviction happens here)."""

    def tensors(self) -> list[Tensor]:
        """Per-token state the policy holds (counted in ``kv_bytes``: it is real memory)."""
        return []

    def static_form(self, storage: TokenStore, capacity: int):
        """A static-capacity cache equal to this policy over ``storage`` (captured decode), or None: eager."""
        return None

    def report(self) -> dict[str, float]:
        return {}


def check_budget(budget, sinks, recent) -> None:
    """ValueErrors naming the setting and its valid range (runs in the constructor)."""
    if not is_number(budget) or (is_int(budget) and budget < 1) or (isinstance(budget, float) and not 0 < budget <= 1):
        fail("policy.budget", "a token count >= 1 (int) or a fraction in (0, 1] (float)", budget)
    int_at_least("policy.sinks", sinks, 0)
    if is_int(budget) and sinks >= budget:
        fail("policy.sinks", f"< budget ({budget})", sinks)
    if not (0.0 <= recent <= 1.0 if isinstance(recent, float) else is_int(recent) and recent >= 0):
        fail("policy.recent", "a token count (int >= 0) or a fraction of the budget in [0, 1]", recent)
    if is_int(budget) and is_int(recent) and sinks + recent > budget:
        fail("policy.sinks + policy.recent", f"<= budget ({budget})", f"{sinks} + {recent}")


class EvictionPolicy(Policy):
    """Base of every eviction method: budgets, protection, timing; subclasses score tokens (``score``, and
    ``update`` + ``queries_needed`` when they score by attention)."""

    # -- what a method declares (class attributes; the static form and kvcompress.testing read them) ----------
    captured = False  # the score ranks the candidates alone (no slot order, no host sync, the base's keep rule):
    #                   the policy has a captured (static-capacity) decode form too
    uneven_heads = False  # heads keep different token counts (AdaKV, DuoAttention): a storage that pads heads
    rewrites_values = False  # ``merge_evicted`` rewrites kept values (CaM): a storage with writable values
    replays = False  # scores a replay of the prompt (KVzip): the engine feeds it again when prefill compresses

    def __init__(self, budget: int | float = 512, sinks: int = 0, recent: int | float = 0, when: str = "decode",
                 slack: int = 0, per_head: bool = False, rerotate: bool = False):
        check_budget(budget, sinks, recent)
        self.when = one_of("policy.when", when, WHEN)
        self.slack = int_at_least("policy.slack", slack, 0)
        self.budget, self.sinks, self.recent = budget, sinks, recent
        self.per_head, self.rerotate = bool(per_head), bool(rerotate)

    def check(self, spec: ModelSpec, storage: TokenStore) -> None:
        super().check(spec, storage)
        # a budget no store can exceed: the policy is the identity, exactly
        self.never_evicts = is_int(self.budget) and min(
            self.layer_budget(layer, self.budget) for layer in range(spec.num_layers)) >= spec.max_position
        name = type(storage).__name__
        if (self.per_head or self.uneven_heads) and spec.num_kv_heads > 1 and not storage.ragged_heads:
            setting = f"policy={type(self).__name__}" if self.uneven_heads else "policy.per_head=true"
            raise ValueError(f"{setting} keeps different tokens per KV head, so the storage must hold ragged heads; "
                             f"{name} with these settings cannot (it codes a token's heads together; "
                             "for storage=latent set storage.per_head=true)")
        if self.rewrites_values and not storage.values_writable:
            raise ValueError(f"policy={type(self).__name__} merges evicted values into kept ones, so the storage "
                             f"must rewrite values; {name} cannot (its values live in a latent)")
        if self.rerotate and storage.keys != "pre_rope":
            raise ValueError(f"policy.rerotate=true rotates keys at their slot in the cache, so the storage must "
                             f"hold them unrotated: set storage.keys=pre_rope ({name} has keys={storage.keys})")

    def reset(self, batch_size: int, owners: list[int]) -> None:
        self.row_seen = torch.zeros(batch_size, dtype=torch.long)
        self.prompt_ended = False  # set by end_prompt: the evaluation's explicit boundary, never guessed
        self.compressed = {o: False for o in owners}
        self.state: dict[int, Tensor | None] = {o: None for o in owners}
        self.evictions = 0
        self.held: dict[int, int] = {}

    # -- budgets -----------------------------------------------------------------------------
    def row_budget(self) -> int:
        """The budget of the fullest row: a token count, or the fraction of its tokens seen."""
        return int(self.device_budget(self.row_seen)) if isinstance(self.budget, float) else self.budget

    def device_budget(self, row_seen: Tensor) -> Tensor:
        """``row_budget`` as a 0-d tensor on ``row_seen``'s device (B,) (the static form: no host sync):
        ``budget``, or ``max(1, ceil(fraction * max(row_seen)))``."""
        if isinstance(self.budget, float):
            return (row_seen.max().double() * self.budget).ceil().long().clamp(min=1)
        return row_seen.new_full((), self.budget)

    def layer_budget(self, owner: int, budget: int) -> int:
        """Per-store schedule (PyramidKV); by default every store gets the same budget."""
        return budget

    def recent_tokens(self, budget: int | Tensor) -> int | Tensor:
        """``recent``, or ``int(recent * budget)`` for a fraction (of an int, or of a 0-d device tensor)."""
        if not isinstance(self.recent, float):
            return self.recent
        return (budget.double() * self.recent).long() if isinstance(budget, Tensor) else int(self.recent * budget)

    def target(self, owner: int, held: int | None = None) -> int:
        """Tokens a store keeps; ``held`` (its token count, when known) for a count that depends on it (ChunkKV)."""
        return self.layer_budget(owner, self.row_budget())

    def heads(self) -> int:
        """Selection groups: Hkv with ``per_head`` (each KV head keeps its own tokens), else 1."""
        return self.spec.num_kv_heads if self.per_head else 1

    # -- the composed cache's calls -------------------------------------------------------------
    def end_prompt(self) -> None:
        self.prompt_ended = True

    def acts_at_prompt_end(self) -> bool:
        return self.when != "decode"

    def start_step(self, steps: int, pos: Tensor) -> None:
        self.row_seen = self.row_seen.to(pos.device) + (pos < PAD_POSITION).sum(1)

    def compresses_prompt(self, owner: int) -> bool:
        """The prompt ended and the store awaits its one prompt-end compression (``when=prefill|both``)."""
        return self.prompt_ended and self.when != "decode" and not self.compressed[owner]

    def evicts_each_step(self) -> bool:
        """Decode-time eviction is on: ``when=decode``, or ``both`` once the prompt ended."""
        return self.when == "decode" or (self.when == "both" and self.prompt_ended)

    def before_attend(self, owner: int, store: TokenStore, steps: int) -> None:
        if self.compresses_prompt(owner):
            self.compressed[owner] = True
            self.evict(owner, store, protect=steps)
            if self.when == "prefill":
                self.state[owner] = None  # no eviction can follow: free the state

    def observing(self, owner: int) -> bool:
        """False once no eviction can follow (a budget never reached, or prefill compression done)."""
        return not (self.never_evicts or (self.when == "prefill" and self.compressed[owner]))

    def weights_wanted(self, owner: int, steps: int) -> int:
        # no eviction can follow: no scores needed (and attention stays the plain kernel)
        return self.queries_needed(owner, steps) if self.observing(owner) else 0

    def observe(self, owner: int, weights: Tensor, pos: Tensor) -> None:
        self.state[owner] = self.update(weights, fit(self.state[owner], weights.shape[-1]), self.heads())

    def observe_queries(self, owner: int, q: Tensor, q_pos: Tensor, rope) -> None:
        if self.observing(owner):
            self.update_queries(owner, q, q_pos, rope)

    def replay_wanted(self) -> bool:
        return self.replays and self.when != "decode" and not self.never_evicts \
            and not any(self.compressed.values())

    def start_replay(self) -> None:
        for owner in self.state:
            self.state[owner] = None  # the score is the replay's attention alone

    def remap(self, owner: int, idx: Tensor) -> None:
        if self.state[owner] is not None:
            self.state[owner] = take(fit(self.state[owner], int(idx.max()) + 1), idx)

    def after_attend(self, owner: int, store: TokenStore, steps: int) -> None:
        if self.evicts_each_step() and store.length > self.target(owner) + self.slack:
            self.evict(owner, store)
        self.held[owner] = store.length

    # -- eviction ----------------------------------------------------------------------------
    def candidates(self, owner: int, store: TokenStore, pos: Tensor) -> Candidates:
        """The store's held tokens as the score sees them; ``pos`` (B, 1|Hkv, T)."""
        return Candidates(owner, pos, fit(self.state[owner], store.length), self.heads(),
                          lambda: store.read()[:2])

    def evict(self, owner: int, store: TokenStore, protect: int = 0) -> None:
        """Keep the store's best tokens within its budget; the last ``protect`` slots always stay."""
        held = store.length
        budget = self.target(owner, held)
        if held <= budget:
            return
        pos = store.positions()
        if pos.dim() == 2:
            pos = pos[:, None]
        score = self.score(self.candidates(owner, store, pos))
        if self.per_head and score.shape[1] == 1:
            score = score.expand(-1, self.spec.num_kv_heads, -1)
        if not self.per_head and score.shape[1] > 1:
            score = score.mean(1, keepdim=True)
        if score.shape[1] > pos.shape[1]:
            pos = pos.expand(-1, score.shape[1], -1)
        idx = self.priority(score, pos, budget, protect).topk(budget, dim=-1).indices.sort(-1).values
        if idx.shape[1] == 1:
            idx = idx[:, 0]
        self.merge_evicted(owner, store, idx)
        store.keep(idx)
        if self.state[owner] is not None:
            state = take(fit(self.state[owner], held), idx)
            if store.length != idx.shape[-1]:  # the store padded ragged rows or heads (a MiniCache pair pads its
                state = follow(state, take(pos, idx), store.positions())  # retained and merged parts apart)
            self.state[owner] = state
        self.evictions += 1

    def priority(self, score: Tensor, pos: Tensor, budget: int | Tensor, protect: int = 0) -> Tensor:
        """Score with the protected slots lifted to +inf, padding to -inf. Within the budget b, protected are the
        last ``n_new = min(protect, b)`` slots (this step's tokens), the ``n_sinks = min(sinks, b - n_new)``
        lowest and the ``n_recent = min(max(recent(b), n_new), b - n_sinks)`` highest real positions. ``budget``:
        an int, or a 0-d device tensor (the static form: fixed shapes, no host sync)."""
        real = pos < PAD_POSITION
        b = torch.as_tensor(budget, device=pos.device)
        n_new = b.clamp(max=protect)
        n_sinks = (b - n_new).clamp(max=self.sinks)
        n_recent = torch.minimum(torch.as_tensor(self.recent_tokens(b), device=pos.device).clamp(min=n_new),
                                 b - n_sinks)
        rank = pos.argsort(dim=-1, stable=True).argsort(-1)  # real positions ascending (padding sorts last)
        from_end = real.sum(-1, keepdim=True) - 1 - rank
        new = torch.arange(pos.shape[-1], device=pos.device) >= pos.shape[-1] - n_new
        lifted = real & (new | (rank < n_sinks) | (from_end < n_recent))
        prio = score.float().nan_to_num(0.0, 0.0, 0.0).masked_fill(~real, float("-inf"))
        return prio.masked_fill(lifted, float("inf"))

    # -- the static form (captured decode) ------------------------------------------------------
    def static_form(self, storage: TokenStore, capacity: int):
        """Fixed-budget eviction over ``storage``'s static form (``cache.policy.captured``), or None (eager decode).

        Needs a method that declares ``captured``, ``when=decode`` (``prefill``/``both`` compress once at the
        prompt's end, before that step attends: not in the static form yet), no ``per_head``, no ``rerotate``, no
        query statistics, and a slot-addressable static storage. Slots: budget + slack (``ceil(fraction *
        capacity)`` for a fractional budget), at most ``capacity``. A budget no store reaches within ``capacity``
        evicts nothing: the storage's own static form."""
        if not self.captured or self.when != "decode" or self.per_head or self.rerotate or self.wants_queries:
            return None
        if self.never_evicts or (is_int(self.budget) and self.budget + self.slack >= capacity):
            return storage.static_form(capacity)
        budget = self.budget if is_int(self.budget) else math.ceil(self.budget * capacity)
        return StaticEvictionCache.over(storage, self, capacity, min(budget + self.slack, capacity))

    # -- what a method implements (kvcompress.cache.policy.score: the same calls on both decode paths) -----------
    def score(self, c: Candidates) -> Tensor:
        """(B, 1 or Hkv, N) importance of the candidates ``c`` (positions, state, keys(), values()), higher = keep."""
        raise NotImplementedError

    def queries_needed(self, owner: int, steps: int) -> int:
        """How many trailing queries the method scores with (0: it needs no attention weights)."""
        return 0

    def update(self, weights: Tensor, state: Tensor | None, heads: int) -> Tensor | None:
        """A step's attention weights (B, Hq, n, N) folded into the per-token state (B, heads, ..., N) (None before
        the first step; new tokens' entries zero); returns the new state. Default: no state."""
        return None

    def update_queries(self, owner: int, q: Tensor, q_pos: Tensor, rope) -> None:
        """Rotated queries of a layer reading the store (methods that declare ``wants_queries``)."""

    def merge_evicted(self, owner: int, store: TokenStore, idx: Tensor) -> None:
        """Before ``store.keep(idx)``: fold what is about to go into what stays (CaM). Default: drop it."""

    # -- accounting ---------------------------------------------------------------------------
    def tensors(self) -> list[Tensor]:
        return [t for t in self.state.values() if t is not None]

    def report(self) -> dict[str, float]:
        held = list(self.held.values())
        out = {"tokens_held_mean": sum(held) / len(held), "tokens_held_max": max(held)} if held else {}
        return {**out, "policy_bytes": sum(t.nbytes for t in self.tensors()),
                "evictions": self.evictions}  # since reset: 0 means this run measured the full cache
