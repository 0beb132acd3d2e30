"""The captured (static-capacity) form of every codec storage: the codec in fixed slots (``buffers.SlotParts``).

Every buffer is allocated once (at the first append after ``reset`` of a new batch size, in the arriving keys'
dtype and device) to ``capacity`` tokens: each layer's packed parts, the positions (B, capacity) filled with
``PAD_POSITION`` (invisible to every real query) and a write index, a 0-d device tensor; later resets clear them
in place, so addresses stay fixed. A forward advances the index by its T tokens in place (at the first layer) and
every layer writes them with ``index_copy_``, so a single-token step has fixed shapes, no host synchronisation and
no Python branch on data: the whole step (embedding to logits) can be recorded once and replayed
(``kvcompress.engine.static``). A traced or recorded step attends over the whole capacity with the mask
``key_pos <= query_pos`` (empty slots are masked): the codec's ``attend_packed`` with the slot count as
``lengths``, else decode + attention. That adds exact zeros but sums in another order (another tiling): equal to
eager within fp rounding. Where the count may be read on the host (not ``capturing()``: prefill chunks, CPU
steps, uncaptured runs) ``attend_parts`` attends the written slots alone with the eager ``CodecStore.attend``'s
arithmetic: the logits equal eager ones bit for bit.

An eviction policy's static form (``cache.policy.captured``) addresses the slots itself: ``encode``, then
``slots.write`` at any slots, every layer's slots allocated ahead by ``allocate_payload``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from kvcompress.cache import base
from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary
from kvcompress.cache.buffers import SlotParts


class FixedSlotCache(KVCache):
    """A codec storage (``storage.codec.CodecStore``) of every layer in ``capacity`` fixed slots."""

    slot_addressable = True  # a codec's parts are per token: any token can be written at any slot (every layer with
    #                          its own codec), so an eviction policy's static form can hold it

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
        self.slots.write(layer, slots, self.encode(layer, k, v, pos, rope))
        if layer == 0:
            self.pos.index_copy_(1, slots, pos)

    def encode(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> dict[str, Tensor]:
        """The parts of new tokens (pre-RoPE keys k, values v at ``pos``) by the layer's own codec, keys as it stores
        them."""
        codec = self.codecs[layer]
        codec.rope = rope  # as a store's ``append`` keeps it: a codec may rotate (part of) pre-RoPE keys itself
        return codec.encode_at(rope.rotate(k, pos) if codec.keys == "post_rope" else k, v, pos)

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        return attend_parts(self.codecs[layer], q, q_pos, self.pos, self.slots.view(layer), self.index)[0]

    def tensors(self) -> Iterable[Tensor]:
        """The whole capacity is held (a static cache reserves it up front)."""
        return [] if self.pos is None else [*self.payload(), self.pos, self.index]

    def calibration_tensors(self) -> list[Tensor]:
        return self.store.calibration_tensors()

    @property
    def tokens_seen(self) -> int:
        return 0 if self.pos is None else int((self.pos < PAD_POSITION).sum())


def capturing() -> bool:
    """Whether this step is being traced (``torch.compile``) or recorded (a CUDA graph): no host read may happen."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def attend_parts(codec, q: Tensor, q_pos: Tensor, k_pos: Tensor, parts: dict[str, Tensor],
                 lengths: Tensor | None = None, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
    """Attention of rotated queries q (B, Hq, Tq, D) over a codec's packed parts at ``k_pos``, the one arithmetic of
    every buffer (module docstring): the codec's kernel (``attend_packed``; ``lengths``: how many leading slots are
    written, None: all) unless it decodes for this step (``decodes_for_attention``: prefill chunks), else decode +
    ``base.attention``; the last ``n_weights`` queries' softmax weights beside it (``base.tail_weights``)."""
    if lengths is not None and not capturing():  # the written slots alone, as the eager store holds them
        n = int(lengths)
        parts, k_pos, lengths = {name: x[:, :, :n] for name, x in parts.items()}, k_pos[..., :n], None
    out = None if codec.decodes_for_attention(q) else codec.attend_packed(q, q_pos, k_pos, parts, lengths)
    if out is not None and n_weights <= 0:
        return out, None
    k, v = (x.to(q.dtype) for x in codec.decode_at(parts, q.dtype, k_pos))
    if out is None:
        out = base.attention(q, k, v, q_pos, k_pos)
    return out, base.tail_weights(q, k, q_pos, k_pos, n_weights)
