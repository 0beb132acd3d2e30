"""``storage=dense``: keys and values as computed, in the model's dtype. The identity of the storage axis."""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.buffers import GrowingBuffer, gather_tokens
from kvcompress.cache.static import StaticKVCache
from kvcompress.cache.storage.base import TokenStore


class DenseStore(TokenStore):
    """Growing buffers, so a decode step never copies the whole history."""

    def clear_payload(self) -> None:
        self.k, self.v = GrowingBuffer(), GrowingBuffer()

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.k.append(k)
        self.v.append(v)

    def read_payload(self) -> tuple[Tensor, Tensor]:
        return self.k.view(), self.v.view()

    def keep_payload(self, idx: Tensor) -> None:
        self.k.replace(gather_tokens(self.k.view(), idx))
        self.v.replace(gather_tokens(self.v.view(), idx))

    def update_values(self, v: Tensor) -> None:
        self.v.replace(v.to(self.v.data.dtype))

    def payload_tensors(self) -> list[Tensor]:
        return self.k.tensors() + self.v.tensors()

    def static_form(self, capacity: int):
        return StaticKVCache(capacity) if self.keys == "post_rope" else None

    def payload_reserved(self) -> list[Tensor]:
        return self.k.reserved() + self.v.reserved()
