"""An eviction policy's captured form: fixed-budget eviction over a codec in fixed slots, with fixed shapes.

Each layer has ``slots`` slots (budget + slack, at most the capacity), one trash slot and one stage slot (a decode
step's new token), all in the storage's slot-addressable static form (``storage.fixed.FixedSlotCache``: every layer
with its own codec), its own positions (``PAD_POSITION``: empty) and, when the method scores by attention, a
per-slot state (H2O's accumulated weights, TOVA's last scores; ``update`` keeps one (B, 1, N) tensor per store,
zeros for new tokens). Slots never move. A step of T tokens:

1. the new tokens are encoded by the layer's codec: a decode step's one token into the stage slot, a prefill
   chunk's T tokens into parts that follow the slots (the stage slot then stays empty);
2. the queries attend over these candidates as the eager store attends over what it holds (``storage.fixed
   .attend_parts``: the codec's kernel or decode + ``base.attention``, the policy's weights computed beside),
   masked by position (``key_pos <= query_pos``);
3. the policy scores every candidate with the functions its eager path calls (``update(weights, state, heads)``,
   ``score(Candidates)``: ``policy.score``) and ``keep_mask`` picks the survivors on the device: all of them, or,
   once the eager store would hold more than budget + slack, the top-``budget`` by the same ``priority`` rules
   (sinks, recent window, padding): the set the eager ``evict`` keeps, only not re-ordered;
4. evicted slots get ``PAD_POSITION`` and a zero state; the surviving new tokens move into free slots (the k-th
   survivor to the k-th lowest free slot, the rest to the trash slot), by ``scatter_``.

Survivors always fit: the eager store holds at most budget + slack tokens after a step. A single-token step has no
host synchronisation and no Python branch on data (budget, fractional budgets ``ceil(fraction * tokens seen)`` and
the evict-or-not rule are device tensors), so it can be recorded as a CUDA graph.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary
from kvcompress.cache.buffers import as_bytes
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.storage.fixed import attend_parts


def slot_addressable(form: KVCache | None) -> bool:
    """A static form the eviction cache can hold: a codec in fixed slots, written at any slots."""
    return bool(getattr(form, "slot_addressable", False))


def keep_mask(policy, score: Tensor, pos: Tensor, row_seen: Tensor, held: Tensor) -> tuple[Tensor, Tensor]:
    """The policy's ``after_attend`` eviction on the device (step 3 above): ``score`` (B, 1|Hkv, N) of the candidates
    at ``pos`` (B, N), ``row_seen`` (B,) tokens seen per row, ``held`` (0-d) the slots the eager store holds after
    this step's append. Returns the keep mask (B, N) and the held count after the step."""
    budget = policy.device_budget(row_seen)
    evicts = held > budget + policy.slack
    if score.shape[1] > 1:
        score = score.mean(1, keepdim=True)
    order = policy.priority(score[:, 0], pos, budget).argsort(dim=-1, descending=True, stable=True).argsort(-1)
    return (pos < PAD_POSITION) & ((order < budget) | ~evicts), torch.where(evicts, budget, held)


class StaticEvictionCache(KVCache):
    """Built by ``policy.static_form(storage, capacity)``; equal to ``ComposedCache(storage, policy)`` within fp
    tolerance (same tokens held, in other slots; exact ties of scores aside). Buffers are allocated at the first
    append (the keys' dtype and device) and cleared in place by later resets of the same batch size."""

    def __init__(self, storage, policy, capacity: int, slots: int):
        self.storage, self.policy, self.capacity, self.slots = storage, policy, capacity, slots
        self.main = storage.static_form(slots + 2)  # the slots, the trash slot (index slots), the stage (slots + 1)
        if not slot_addressable(self.main):
            raise ValueError(f"{type(self.main).__name__} is not slot-addressable")
        self.batch_size = 0
        self.pos = self.new = None

    @classmethod
    def over(cls, storage, policy, capacity: int, slots: int) -> StaticEvictionCache | None:
        """The cache, or None where the storage's static form is not slot-addressable (eager decode)."""
        return cls(storage, policy, capacity, slots) if slot_addressable(storage.static_form(1)) else None

    def setup(self, spec: ModelSpec) -> None:
        super().setup(spec)
        self.main.setup(spec)

    def reset(self, batch_size: int) -> None:
        """Clear the buffers in place (same addresses); another batch size drops them for a new allocation."""
        self.batch_size = batch_size
        if self.pos is None or self.pos.shape[1] != batch_size:
            self.pos = None
            return
        for t in self.tensors():
            t.zero_()
        self.pos.fill_(PAD_POSITION)

    def _allocate(self, k: Tensor) -> None:
        L, B, dev, n = self.spec.num_layers, self.batch_size, k.device, self.slots + 2
        self.main.reset(B)
        self.main.allocate_payload(self.main.dtype or k.dtype, dev)
        self.pos = torch.full((L, B, n), PAD_POSITION, dtype=torch.int64, device=dev)
        weighs = self.policy.queries_needed(0, 1) > 0  # a method that scores by attention keeps a per-slot state
        self.state = torch.zeros((L, B, 1, n), device=dev) if weighs else None
        self.stage = torch.tensor([self.slots + 1], device=dev)
        self.held = torch.zeros((), dtype=torch.int64, device=dev)  # slots the eager store holds (padding too)
        self.row_seen = torch.zeros((B,), dtype=torch.int64, device=dev)
        self.evictions = torch.zeros((), dtype=torch.int64, device=dev)

    # -- the engine's calls ----------------------------------------------------------------------
    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        if self.pos is None:
            self._allocate(k)
        T = k.shape[2]
        if layer == 0:
            self.row_seen.add_((pos < PAD_POSITION).sum(1))
            self.held.add_(T)
        parts = self.main.encode(layer, k, v, pos, rope)
        if T == 1:  # into the stage slot: the candidates are the layer's slots as they are (no copy)
            self.main.slots.write(layer, self.stage, parts)
            self.pos[layer, :, -1:].copy_(pos)
            self.new = None
        else:  # a prefill chunk: its tokens follow the slots
            self.new = parts, pos

    def candidates(self, layer: int) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        """The layer's slots and the step's new tokens (in the stage slot, or after it): parts (B, H, N, ...),
        positions (B, N) and the per-slot state (B, 1, N) (zeros for new tokens), N = slots + 2 (+ T)."""
        parts, pos = self.main.slots.view(layer), self.pos[layer]
        state = None if self.state is None else self.state[layer]
        if self.new is not None:
            new, new_pos = self.new
            parts = {name: torch.cat([x, new[name]], 2) for name, x in parts.items()}
            pos = torch.cat([pos, new_pos], -1)
            if state is not None:
                state = torch.cat([state, state.new_zeros(*state.shape[:2], new_pos.shape[1])], -1)
        return parts, pos, state

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        T, codec = q.shape[2], self.main.codecs[layer]
        parts, pos, state = self.candidates(layer)
        n = min(self.policy.queries_needed(layer, T), T)
        out, weights = attend_parts(codec, q, q_pos, pos, parts, None, n)
        if weights is not None:  # as the composed cache observes: padding queries' weights zeroed
            state = self.policy.update(weights * (q_pos[:, T - n :] < PAD_POSITION)[:, None, :, None], state, 1)
        tokens = Candidates(layer, pos[:, None], state, 1, lambda: codec.decode_at(parts, q.dtype, pos))
        keep, held = keep_mask(self.policy, self.policy.score(tokens), pos, self.row_seen, self.held)
        self._settle(layer, keep, pos, state, parts)
        if layer == self.spec.num_layers - 1:  # every layer evicts on the same rule: count once per step
            self.evictions.add_(self.spec.num_layers * (held < self.held))
            self.held.copy_(held)
        return out

    def _settle(self, layer: int, keep: Tensor, pos: Tensor, state: Tensor | None, parts: dict[str, Tensor]) -> None:
        """Step 4 above; the stage slot is empty again."""
        S = self.slots
        B, T = pos.shape[0], pos.shape[1] - S - 1
        kept, new = keep[:, : S + 1], keep[:, S + 1 :]
        old_pos = torch.where(kept, pos[:, : S + 1], PAD_POSITION)
        slot = torch.arange(S + 1, device=pos.device)
        free = torch.where((old_pos == PAD_POSITION) & (slot < S), slot, S)  # taken slots (and the trash) -> S
        k = min(T, S + 1)
        lowest = free.topk(k, -1, largest=False).values  # free slots ascending, then S
        dest = torch.where(new, lowest.gather(-1, (new.cumsum(-1) - 1).clamp(0, k - 1)), S)  # (B, T)
        self.pos[layer, :, : S + 1].copy_(old_pos.scatter(-1, dest, torch.where(new, pos[:, S + 1 :], PAD_POSITION)))
        self.pos[layer, :, S + 1 :].fill_(PAD_POSITION)
        for name, buf in self.main.slots.view(layer).items():
            src = as_bytes(parts[name][:, :, S + 1 :]).clone()  # float8 as bytes; a copy: the stage slot is buf's own
            buf = as_bytes(buf)
            buf.scatter_(2, dest.view(B, 1, T, *[1] * (src.dim() - 3)).expand_as(src), src)
        if state is not None:
            old = torch.where(kept[:, None], state[..., : S + 1], 0.0)
            new_state = torch.where(new[:, None], state[..., S + 1 :], 0.0)
            self.state[layer, ..., : S + 1].copy_(old.scatter(-1, dest[:, None], new_state))
            self.state[layer, ..., S + 1 :].zero_()

    # -- what it holds -----------------------------------------------------------------------------
    def positions(self, layer: int) -> Tensor:
        """(B, slots + 2) positions of the layer's slots (``PAD_POSITION``: empty, trash or stage), in slot order."""
        return self.pos[layer]

    def tensors(self) -> Iterable[Tensor]:
        """Every buffer: the slots' payload and positions, the policy's per-slot state, counters."""
        if self.pos is None:
            return []
        state = [] if self.state is None else [self.state]
        return [*self.main.payload(), self.pos, *state, self.held, self.row_seen, self.evictions]

    @property
    def tokens_seen(self) -> int:
        return 0 if self.pos is None else int(self.row_seen.sum())

    def memory_report(self) -> dict[str, float]:
        """As the eager composed cache reports: tokens held (the store's slot count), policy bytes, evictions."""
        out = {**super().memory_report(), **self.storage.report()}
        if self.pos is not None:
            held = int(self.held)
            out.update(tokens_held_mean=held, tokens_held_max=held, evictions=int(self.evictions),
                       policy_bytes=0 if self.state is None else self.state.nbytes)
        return out
