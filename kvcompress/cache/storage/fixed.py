"""The captured (static-capacity) form of every codec storage: the codec in fixed slots (``buffers.SlotParts``).

Every buffer is allocated once (at the first append after ``reset`` of a new batch size, in the arriving keys'
dtype and device) to ``capacity`` tokens: each layer's packed parts, the positions (B, capacity) filled with
``PAD_POSITION`` (invisible to every real query) and a write index, a 0-d device tensor; later resets clear them
in place, so addresses stay fixed. A forward advances the index by its T tokens in place (at the first layer) and
every layer writes them with ``index_copy_``, so a single-token step has fixed shapes, no host synchronisation and
no Python branch on data: the whole step (embedding to logits) can be recorded once and replayed
(``kvcompress.engine.static``). Attention runs over the capacity with the mask ``key_pos <= query_pos`` (empty
slots are masked): the codec's ``attend_packed`` with the slot count as ``lengths``, else decode + attention.

For an eviction policy's static form (``cache.static.evict``) the cache is slot-addressable: ``write(layer, slots,
k, v)`` stores rotated tokens at any slots, ``slot_tokens(layer, dtype)`` decodes every slot, ``payload()`` lists
the per-slot buffers and ``allocate_payload(dtype, device)`` allocates them ahead of the first token.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary
from kvcompress.cache.buffers import SlotParts


class FixedSlotCache(KVCache):
    """A codec storage (``storage.codec.CodecStore``) of every layer in ``capacity`` fixed slots."""

    @property
    def slot_addressable(self) -> bool:
        """A codec's parts are per token: any token can be written at any slot. Not where the codec differs per layer
        (calibrated per layer): eviction's static form encodes new tokens in a one-layer stage."""
        return not getattr(self.store, "codec_per_layer", False)

    def __init__(self, store, capacity: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.store, self.capacity, self.dtype, self.device = store, capacity, dtype, device
        self.batch_size = 0
        self.slots: SlotParts | None = None
        self.pos = self.index = None

    def setup(self, spec: ModelSpec) -> None:
        if self.capacity > spec.max_position:
            raise ValueError(f"capacity={self.capacity} must be <= max_position={spec.max_position}")
        super().setup(spec)
        if self.store is not None:
            self.store.check(spec)

    def reset(self, batch_size: int) -> None:
        """Clear the buffers in place (same addresses); another batch size drops them for a new allocation."""
        self.batch_size = batch_size
        if self.pos is None or self.pos.shape[0] != batch_size:
            self.pos = self.index = None
            if self.device is not None:  # allocate now where the device and dtype are known
                self._allocate(self.dtype or torch.float32, torch.device(self.device))
            return
        for t in self.payload():
            t.zero_()
        self.pos.fill_(PAD_POSITION)
        self.index.zero_()

    def payload(self) -> list[Tensor]:
        return [] if self.slots is None else self.slots.tensors()

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        self.allocate_payload(dtype, device)
        self.pos = torch.full((self.batch_size, self.capacity), PAD_POSITION, dtype=torch.int64, device=device)
        self.index = torch.zeros((), dtype=torch.int64, device=device)

    def allocate_payload(self, dtype: torch.dtype, device: torch.device) -> None:
        """Every layer's parts for ``capacity`` slots, shaped and typed by encoding one zero token per layer."""
        s = self.spec
        self.codecs = [self.store.fresh(layer) for layer in range(s.num_layers)]
        zero = torch.zeros((self.batch_size, s.num_kv_heads, 1, s.head_dim), dtype=dtype, device=device)
        self.slots = SlotParts([codec.encode(zero, zero) for codec in self.codecs], self.capacity)

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        if self.pos is None:
            self._allocate(self.dtype or k.dtype, k.device)
        T = k.shape[2]
        if layer == 0:  # the first layer advances the index: every layer's attend then sees the new tokens
            self.index.add_(T)
        slots = self.index - T + torch.arange(T, device=k.device)
        codec = self.codecs[layer]
        codec.rope = rope  # as a store's ``append`` keeps it: a codec may rotate (part of) pre-RoPE keys itself
        k = rope.rotate(k, pos) if codec.keys == "post_rope" else k
        self.slots.write(layer, slots, codec.encode_at(k, v, pos))
        if layer == 0:
            self.pos.index_copy_(1, slots, pos)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store rotated keys and values of the new tokens at ``slots``."""
        self.slots.write(layer, slots, self.codecs[layer].encode(k, v))

    def slot_tokens(self, layer: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of every slot of a layer, (B, Hkv, capacity, D) in ``dtype``."""
        k, v = self.codecs[layer].decode(self.slots.view(layer), dtype)
        return k.to(dtype), v.to(dtype)

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        out = self.codecs[layer].attend_packed(q, q_pos, self.pos, self.slots.view(layer), self.index)
        if out is not None:
            return out
        mask = self.pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, Tq, capacity)
        k, v = self.slot_tokens(layer, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def tensors(self) -> Iterable[Tensor]:
        """The whole capacity is held (a static cache reserves it up front)."""
        return [] if self.pos is None else [*self.payload(), self.pos, self.index]

    def calibration_tensors(self) -> list[Tensor]:
        return [] if self.store is None else self.store.calibration_tensors()

    @property
    def tokens_seen(self) -> int:
        return 0 if self.pos is None else int((self.pos < PAD_POSITION).sum())
