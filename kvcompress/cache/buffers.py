"""Token buffers and token gathering, shared by every storage and policy.

A storage's packed per-token tensors (``storage.codec``: a dict of name -> (B, H, T, ...)) live in a buffer the
storage does not implement: ``GrowingParts`` (eager decode: grows, gathers on eviction, frees on ``replace``) or
``SlotParts`` (captured decode: every layer's capacity allocated once, written at given slots in place), or, once
KV heads keep different token counts, ``cache.pages.PagedParts`` (pages per row and head, no padding). Float8
tensors are moved through a uint8 view (CPU has no gather / index_copy for float8), so a codec may hold real
1-byte float8 codes.
"""
from __future__ import annotations

import torch
from torch import Tensor


class GrowingBuffer:
    """A (B, H, capacity, *rest) tensor that doubles its capacity along dim 2 when full.

    ``replace`` (after eviction) re-allocates to 1.5x what is held once the allocation exceeds that, so
    evicted tokens free real memory and a decode step after an eviction still appends in place.
    """

    def __init__(self) -> None:
        self.data: Tensor | None = None
        self.length = 0

    def append(self, x: Tensor) -> None:
        n = x.shape[2]
        if self.data is None or self.length + n > self.data.shape[2] or self.data.shape[1] != x.shape[1]:
            self._grow(x, self.length + n)
        self.data[:, :, self.length : self.length + n] = x
        self.length += n

    def _grow(self, x: Tensor, needed: int) -> None:
        capacity = max(needed, 2 * (self.data.shape[2] if self.data is not None else 0), 16)
        heads = x.shape[1] if self.data is None else max(x.shape[1], self.data.shape[1])
        new = x.new_empty((x.shape[0], heads, capacity, *x.shape[3:]))
        if self.data is not None and self.length:
            new[:, :, : self.length] = self.data[:, :, : self.length]
        self.data = new

    def view(self) -> Tensor:
        return self.data[:, :, : self.length]

    def replace(self, x: Tensor) -> None:
        """Hold ``x`` instead (fewer or re-ordered tokens, maybe more heads)."""
        n = x.shape[2]
        capacity = max(16, n + n // 2)
        if self.data is None or x.shape[1] != self.data.shape[1] or not n <= self.data.shape[2] <= capacity:
            self.data = x.new_empty((x.shape[0], x.shape[1], capacity, *x.shape[3:]))
        self.data[:, :, :n] = x
        self.length = n

    def tensors(self) -> list[Tensor]:
        return [self.view()] if self.data is not None else []

    def reserved(self) -> list[Tensor]:
        return [self.data] if self.data is not None else []


def as_bytes(x: Tensor) -> Tensor:
    """A 1-byte float (float8) as its uint8 view, for the ops CPU lacks for float8; any other tensor as is."""
    return x.view(torch.uint8) if x.dtype.is_floating_point and x.element_size() == 1 else x


def gather_tokens(x: Tensor, idx: Tensor, dim: int = 2) -> Tensor:
    """Select tokens along ``dim`` of x (B, H, T, ...) with idx (B, T') or (B, H', T'); ``dim=-1``: per-token state
    (B, H, ..., T). Heads broadcast (to the larger of H, H')."""
    if as_bytes(x) is not x:
        return gather_tokens(as_bytes(x), idx, dim).view(x.dtype)
    if idx.dim() == 2:
        idx = idx[:, None]
    heads = max(x.shape[1], idx.shape[1])
    x = x.expand(x.shape[0], heads, *x.shape[2:])
    dim %= x.dim()
    idx = idx.reshape(*idx.shape[:2], *([1] * (dim - 2)), idx.shape[2], *([1] * (x.dim() - dim - 1)))
    return torch.gather(x, dim, idx.expand(*x.shape[:dim], idx.shape[dim], *x.shape[dim + 1:]))


class GrowingParts:
    """Named per-token tensors (B, H, T, ...) in ``GrowingBuffer``s: a codec's packed tokens, eager."""

    def __init__(self) -> None:
        self.buffers: dict[str, GrowingBuffer] = {}

    def append(self, parts: dict[str, Tensor]) -> None:
        for name, x in parts.items():
            self.buffers.setdefault(name, GrowingBuffer()).append(x)

    def view(self) -> dict[str, Tensor]:
        return {name: b.view() for name, b in self.buffers.items()}

    def keep(self, idx: Tensor) -> None:
        """Keep tokens ``idx`` (B, T') or (B, H', T') of every part (kept codes are gathered, never re-encoded)."""
        for b in self.buffers.values():
            b.replace(gather_tokens(b.view(), idx))

    def replace(self, name: str, x: Tensor) -> None:
        self.buffers[name].replace(x.to(self.buffers[name].data.dtype))

    @property
    def length(self) -> int:
        return next(iter(self.buffers.values())).length if self.buffers else 0

    def tensors(self) -> list[Tensor]:
        return [t for b in self.buffers.values() for t in b.tensors()]

    def reserved(self) -> list[Tensor]:
        return [t for b in self.buffers.values() for t in b.reserved()]


class SlotParts:
    """Named per-token tensors of every layer in fixed slots: (L, B, H, capacity, ...) each, allocated once from
    one layer's example tokens, written in place at given slots (``index_copy_``: no host sync, capturable)."""

    def __init__(self, examples: list[dict[str, Tensor]], capacity: int):
        """``examples[layer]``: that layer's parts of one token (B, H, 1, ...): names, heads, trailing dims, dtype."""
        self.parts = [{name: x.new_zeros((*x.shape[:2], capacity, *x.shape[3:])) for name, x in ex.items()}
                      for ex in examples]

    def write(self, layer: int, slots: Tensor, parts: dict[str, Tensor]) -> None:
        for name, x in parts.items():
            buf = self.parts[layer][name]
            as_bytes(buf).index_copy_(2, slots, as_bytes(x.to(buf.dtype)))

    def view(self, layer: int) -> dict[str, Tensor]:
        return self.parts[layer]

    def tensors(self) -> list[Tensor]:
        return [t for layer in self.parts for t in layer.values()]


def take(state: Tensor, idx: Tensor) -> Tensor:
    """Gather per-token state (B, H', ..., T) with keep indices (B, K) or (B, Hkv, K) along the last dim."""
    return gather_tokens(state, idx, -1)


def follow(state: Tensor, old_pos: Tensor, new_pos: Tensor) -> Tensor:
    """Per-token state (B, H', ..., K) of the tokens at ``old_pos`` (B, 1|Hkv, K) moved to the slots of a store
    now holding ``new_pos`` (B, T) or (B, 1|Hkv, T), by position (a held position is unique per row and head);
    slots no old token moved to (invisible padding) get 0. For stores whose ``keep`` pads ragged rows or heads."""
    new_pos = new_pos if new_pos.dim() == 3 else new_pos[:, None]
    heads = max(old_pos.shape[1], new_pos.shape[1])
    old = old_pos.long().expand(old_pos.shape[0], heads, -1)
    new = new_pos.long().expand(new_pos.shape[0], heads, -1).contiguous()
    order = old.argsort(-1)
    ranked = old.gather(-1, order).contiguous()
    loc = torch.searchsorted(ranked, new).clamp_max(old.shape[-1] - 1)
    found = ranked.gather(-1, loc) == new
    moved = take(state, order.gather(-1, loc))
    return moved * found.reshape(*found.shape[:2], *([1] * (moved.dim() - 3)), found.shape[-1])


def fit(state: Tensor | None, length: int) -> Tensor | None:
    """Pad per-token state with zeros up to ``length`` tokens (new tokens have no score yet)."""
    if state is None or state.shape[-1] >= length:
        return state
    return torch.nn.functional.pad(state, (0, length - state.shape[-1]))


def pick_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``mask`` (..., T), the indices where it holds, in order, padded to the fullest row with
    index 0; and which entries are real. Rows (batch rows, heads) then keep different tokens in one tensor."""
    count = int(mask.sum(-1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :count]
    valid = torch.gather(mask, -1, order)
    return order.masked_fill(~valid, 0), valid
