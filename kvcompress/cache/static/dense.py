"""The full cache in static-capacity buffers (the base of every static form)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary


class StaticKVCache(KVCache):
    """Dense K/V of every layer in fixed buffers of ``capacity`` tokens (the full cache, captured-decode form)."""

    def __init__(self, capacity: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.batch_size = 0
        self.k = self.v = self.pos = self.index = None
        self.ks = self.vs = self.kz = self.vz = None

    def setup(self, spec: ModelSpec) -> None:
        if self.capacity > spec.max_position:
            raise ValueError(f"capacity={self.capacity} must be <= max_position={spec.max_position}")
        super().setup(spec)

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
        return [self.k, self.v]

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        self.allocate_payload(dtype, device)
        self.pos = torch.full((self.batch_size, self.capacity), PAD_POSITION, dtype=torch.int64, device=device)
        self.index = torch.zeros((), dtype=torch.int64, device=device)

    def allocate_payload(self, dtype: torch.dtype, device: torch.device) -> None:
        s = self.spec
        shape = (s.num_layers, self.batch_size, s.num_kv_heads, self.capacity, s.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        if self.pos is None:
            self._allocate(self.dtype or k.dtype, k.device)
        T = k.shape[2]
        if layer == 0:  # the first layer advances the index: every layer's attend then sees the new tokens
            self.index.add_(T)
        slots = self.index - T + torch.arange(T, device=k.device)
        self.write(layer, slots, rope.rotate(k, pos), v)
        if layer == 0:
            self.pos.index_copy_(1, slots, pos)

    slot_addressable = True  # any token can be written at any slot (what an eviction policy's static form needs)

    def slot_tokens(self, layer: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of every slot of a layer, (B, Hkv, capacity, D) in ``dtype``."""
        return self.k[layer].to(dtype), self.v[layer].to(dtype)

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Store rotated keys and values of the new tokens at ``slots``."""
        self.k[layer].index_copy_(2, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        mask = self.pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, Tq, capacity)
        k, v = self.k[layer].to(q.dtype), self.v[layer].to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def tensors(self) -> Iterable[Tensor]:
        """The whole capacity is held (a static cache reserves it up front)."""
        return [] if self.pos is None else [*self.payload(), self.pos, self.index]

    @property
    def tokens_seen(self) -> int:
        return 0 if self.pos is None else int((self.pos < PAD_POSITION).sum())
