"""Fixed-budget eviction in static-capacity buffers: an eviction policy's decode step with fixed shapes.

Each layer has ``slots`` slots (budget + slack, at most the capacity) plus one trash slot, its own positions
(``PAD_POSITION``: empty) and, when the method scores by attention, a per-slot state (H2O's accumulated weights,
TOVA's last scores; a method's ``update`` keeps one (B, 1, N) tensor per store, zeros for new tokens).
Slots never move. A step of T tokens:

1. the new tokens are encoded into a T-slot stage (the storage's own static form, one layer);
2. the queries attend over the layer's slots and the stage together (one explicit softmax: the policy may
   read the weights), masked by position (``key_pos <= query_pos``);
3. the policy scores every candidate (held slots and new tokens) with the functions its eager path calls
   (``update(weights, state, heads)``, ``score(Candidates)``: ``policy.score``) and ``static_keep`` picks
   the survivors on the device: all of them, or, once the eager store would hold more than budget + slack,
   the top-``budget`` by the same ``priority`` rules (sinks, recent window, padding) -- the set the eager
   ``evict`` keeps, only not re-ordered;
4. evicted slots get ``PAD_POSITION`` and a zero state; the surviving new tokens move from the stage into free
   slots (the k-th survivor to the k-th lowest free slot, the rest to the trash slot), by ``scatter_``.

Survivors always fit: the eager store holds at most budget + slack tokens after a step. A single-token step
has no host synchronisation and no Python branch on data (budget, fractional budgets ``ceil(fraction * tokens
seen)`` and the evict-or-not rule are device tensors), so it can be recorded as a CUDA graph; a multi-token
step (prefill chunk) takes a fresh stage of its length. The storage's static form must be slot-addressable:
``write(layer, slots, k, v)`` stores at the given slots and every ``payload()`` tensor is (L, B, Hkv, slots,
...). The dense ``StaticKVCache`` is, and the per-token quantized form without a residual; KIVI's residual window
(placed by its own count) and the latent form are not.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary
from kvcompress.cache.buffers import as_bytes
from kvcompress.cache.policy.score import Candidates


def slot_addressable(form: KVCache | None) -> bool:
    """A static form the eviction cache can hold: written at any slots, every payload tensor per slot."""
    return bool(getattr(form, "slot_addressable", False))


def layer_parts(form: KVCache, layer: int) -> list[Tensor]:
    """A slot-addressable form's per-slot tensors of one layer, (B, H, slots, ...) each: a codec in fixed slots
    (``storage.fixed``) holds them per layer; the older forms stack layers first, (L, B, H, slots, ...)."""
    slots = getattr(form, "slots", None)
    if slots is not None and hasattr(slots, "view"):
        return list(slots.view(layer).values())
    return [buf[layer] for buf in form.payload()]


def joint_attention(q: Tensor, q_pos: Tensor, keys: list[Tensor], values: list[Tensor], k_pos: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """Attention of q (B, Hq, T, D) over the slots of several parts (B, Hkv, n_i, D) at ``k_pos`` (B, sum n_i) as one
    softmax, without concatenating K/V; returns the output and the weights (B, Hq, T, sum n_i)."""
    B, Hq, T, D = q.shape
    H = keys[0].shape[1]
    rows = q.reshape(B, H, Hq // H * T, D)  # the query heads of a KV head: head h reads KV head h // (Hq / H)
    scores = torch.cat([rows @ k.transpose(-1, -2) for k in keys], -1) * D**-0.5
    mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    weights = scores.view(B, Hq, T, -1).masked_fill(~mask, float("-inf")).float().softmax(-1).to(q.dtype)
    w, out, lo = weights.view(B, H, Hq // H * T, -1), 0, 0
    for v in values:
        out = out + w[..., lo : lo + v.shape[2]] @ v
        lo += v.shape[2]
    return out.reshape(B, Hq, T, -1), weights


class StaticEvictionCache(KVCache):
    """An ``EvictionPolicy`` over a storage's slot-addressable static form, in ``slots`` (+ 1 trash) slots per layer.

    Built by ``policy.static_form(storage, capacity)``; equal to ``ComposedCache(storage, policy)`` within fp
    tolerance (same tokens held, in other slots; exact ties of scores aside). Buffers are allocated at the first
    append (the keys' dtype and device) and cleared in place by later resets of the same batch size.
    """

    def __init__(self, storage, policy, capacity: int, slots: int):
        self.storage, self.policy, self.capacity, self.slots = storage, policy, capacity, slots
        self.main = storage.static_form(slots + 1)
        if not slot_addressable(self.main):
            raise ValueError(f"{type(self.main).__name__} is not slot-addressable")
        self.batch_size = 0
        self.pos = None

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

    def _form(self, slots: int, spec: ModelSpec, like: Tensor) -> KVCache:
        form = self.storage.static_form(slots)
        form.setup(spec)
        form.reset(self.batch_size)
        form.allocate_payload(form.dtype or like.dtype, like.device)
        return form

    def _allocate(self, k: Tensor) -> None:
        L, B, dev = self.spec.num_layers, self.batch_size, k.device
        self.main.reset(B)
        self.main.allocate_payload(self.main.dtype or k.dtype, dev)
        self.one_layer = dataclasses.replace(self.spec, num_layers=1)
        self.stage = self.new = self._form(1, self.one_layer, k)  # a decode step's stage: fixed address
        self.pos = torch.full((L, B, self.slots + 1), PAD_POSITION, dtype=torch.int64, device=dev)
        weighs = self.policy.queries_needed(0, 1) > 0  # a method that scores by attention keeps a per-slot state
        self.state = torch.zeros((L, B, 1, self.slots + 1), device=dev) if weighs else None
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
            self.new = self.stage if T == 1 else self._form(T, self.one_layer, k)
        self.new_pos = pos
        self.new.write(0, torch.arange(T, device=k.device), rope.rotate(k, pos), v)

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        B, T = q.shape[0], q.shape[2]
        (km, vm), (kn, vn) = self.main.slot_tokens(layer, q.dtype), self.new.slot_tokens(0, q.dtype)
        pos = torch.cat([self.pos[layer], self.new_pos], -1)  # candidates: the held slots, then the new tokens
        out, w = joint_attention(q, q_pos, [km, kn], [vm, vn], pos)
        n = self.policy.queries_needed(layer, T)
        weights = w[:, :, T - n :] * (q_pos[:, T - n :] < PAD_POSITION)[:, None, :, None] if n else None
        state = None if self.state is None else torch.cat([self.state[layer], self.state.new_zeros(B, 1, T)], -1)
        if weights is not None:
            state = self.policy.update(weights, state, 1)
        tokens = Candidates(layer, pos[:, None], state, 1, lambda: (torch.cat([km, kn], 2), torch.cat([vm, vn], 2)))
        keep, held = self.policy.static_keep(self.policy.score(tokens), pos, self.row_seen, self.held)
        self._settle(layer, keep, pos, state)
        if layer == self.spec.num_layers - 1:  # every layer evicts on the same rule: count once per step
            self.evictions.add_(self.spec.num_layers * (held < self.held))
            self.held.copy_(held)
            self.new = self.stage  # a prefill chunk's stage is working memory only
        return out

    def _settle(self, layer: int, keep: Tensor, pos: Tensor, state: Tensor | None) -> None:
        """Evicted slots become empty; surviving new tokens move from the stage into free slots (others: trash)."""
        S = self.slots
        B, T = pos.shape[0], pos.shape[1] - S - 1
        kept, new = keep[:, : S + 1], keep[:, S + 1 :]
        old_pos = torch.where(kept, pos[:, : S + 1], PAD_POSITION)
        slot = torch.arange(S + 1, device=pos.device)
        free = torch.where((old_pos == PAD_POSITION) & (slot < S), slot, S)  # taken slots (and the trash) -> S
        k = min(T, S + 1)
        lowest = free.topk(k, -1, largest=False).values  # free slots ascending, then S
        dest = torch.where(new, lowest.gather(-1, (new.cumsum(-1) - 1).clamp(0, k - 1)), S)  # (B, T)
        self.pos[layer].copy_(old_pos.scatter(-1, dest, torch.where(new, pos[:, S + 1 :], PAD_POSITION)))
        for buf, src in zip(layer_parts(self.main, layer), layer_parts(self.new, 0), strict=True):
            buf, src = as_bytes(buf), as_bytes(src)  # float8 parts move as bytes (CPU has no float8 scatter)
            idx = dest.view(B, 1, T, *[1] * (src.dim() - 3)).expand_as(src)
            buf.scatter_(2, idx, src)
        if state is not None:
            old = torch.where(kept[:, None], state[..., : S + 1], 0.0)
            self.state[layer].copy_(old.scatter(-1, dest[:, None], torch.where(new[:, None], state[..., S + 1 :], 0.0)))

    # -- what it holds -----------------------------------------------------------------------------
    def positions(self, layer: int) -> Tensor:
        """(B, slots + 1) positions of the layer's slots (``PAD_POSITION``: empty or trash), in slot order."""
        return self.pos[layer]

    def tensors(self) -> Iterable[Tensor]:
        """Every buffer: the slots' payload and positions, the policy's per-slot state, the decode stage, counters."""
        if self.pos is None:
            return []
        state = [] if self.state is None else [self.state]
        return [*self.main.payload(), self.pos, *state, *self.stage.payload(), self.held, self.row_seen,
                self.evictions]

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
