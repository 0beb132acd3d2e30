"""``storage=dense``: keys and values as computed, in the model's dtype. The identity of the storage axis."""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.fixed import FixedSlotCache


class DenseStore(CodecStore):
    """The identity codec: the parts are the keys and values themselves (growing buffers eagerly, so a decode step
    never copies the whole history; fixed slots when captured)."""

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        return {"k": k, "v": v}

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        return parts["k"].to(dtype), parts["v"].to(dtype)

    def update_values(self, v: Tensor) -> None:
        self.parts.replace("v", v)

    def static_form(self, capacity: int):
        return StaticKVCache(capacity) if self.keys == "post_rope" else None


class StaticKVCache(FixedSlotCache):
    """The full cache in fixed slots (captured decode): ``DenseStore`` in a ``FixedSlotCache``."""

    def __init__(self, capacity: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(DenseStore(), capacity, dtype, device)
