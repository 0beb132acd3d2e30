"""The default cache: one TokenStore per layer, reconstruct then attend.

Strategies that change *how tokens are stored* only pick a storage; strategies that change *which
tokens* or *which layers* subclass this and override a hook (``after_append``, ``store_for``, or
``attend``). That is how the families compose.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary, attention
from kvcompress.cache.store import TokenStore, storage_factory

KeyMode = Literal["post_rope", "pre_rope"]


class LayeredCache(KVCache):
    """Per-layer stores of any ``storage``; keys stored after RoPE (default) or before it.

    With ``keys="pre_rope"`` keys are stored unrotated and rotated at their stored positions at
    attention time (KVQuant-style quantization, low-rank projection).
    """

    def __init__(self, storage: str = "dense", storage_params: dict | None = None, keys: KeyMode = "post_rope"):
        if keys not in ("post_rope", "pre_rope"):
            raise ValueError(f"keys must be 'post_rope' or 'pre_rope', got {keys!r}")
        self.storage, self.storage_params, self.keys = storage, dict(storage_params or {}), keys
        self.new_store = storage_factory(storage, **self.storage_params)
        self.stores: list[TokenStore] = []
        self.rope: Rotary | None = None
        self._seen = torch.zeros((), dtype=torch.long)

    def setup(self, spec: ModelSpec) -> None:
        super().setup(spec)
        self.new_store().check(spec)

    def reset(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.stores = [self.new_store() for _ in range(self.spec.num_layers)]
        self._seen = torch.zeros((), dtype=torch.long)

    def store_for(self, layer: int) -> TokenStore:
        """The store that holds ``layer``'s history (sharing strategies map several layers to one)."""
        return self.stores[layer]

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        self.rope = rope
        if layer == 0:
            self._seen = self._seen.to(pos.device) + (pos < PAD_POSITION).sum()
        if self.keys == "post_rope":
            k = rope.rotate(k, pos)
        self.store_for(layer).append(k, v, pos)
        self.after_append(layer)

    def after_append(self, layer: int) -> None:
        """Hook for eviction policies: runs after every append."""

    def read(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated keys, values and positions of everything ``layer`` can attend to."""
        k, v, pos = self.store_for(layer).read()
        if self.keys == "pre_rope":
            k = self.rope.rotate(k, pos)
        return k, v, pos

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        k, v, pos = self.read(layer)
        return attention(q, k.to(q.dtype), v.to(q.dtype), q_pos, pos)

    def held_stores(self) -> list[TokenStore]:
        """Distinct stores (a shared store counts once)."""
        seen: dict[int, TokenStore] = {}
        for s in self.stores:
            seen.setdefault(id(s), s)
        return list(seen.values())

    def tensors(self) -> Iterable[Tensor]:
        return [t for s in self.held_stores() for t in s.tensors()]

    def reserved_bytes(self) -> int:
        """Bytes allocated, spare buffer capacity included (``kv_bytes`` counts what is held)."""
        return sum(t.nbytes for s in self.held_stores() for t in s.reserved_tensors())

    @property
    def tokens_seen(self) -> int:
        return int(self._seen)
