"""How one layer's tokens are stored. The storage axis of composition.

A ``TokenStore`` holds keys, values and positions of one layer for every batch row. Eviction
picks rows' tokens with ``keep``; sharing points several layers at one store; quantized and
other representations subclass it. ``DenseStore`` keeps them as they come, in growing buffers
so a decode step never copies the whole history.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec


class TokenStore(ABC):
    """One layer's tokens for B rows. Positions are (B, T), or (B, Hkv, T) once heads diverge."""

    def check(self, spec: ModelSpec) -> None:
        """Validate settings against the model's dimensions (before weights load)."""

    @abstractmethod
    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Add tokens: k, v (B, Hkv, T, D), pos (B, T)."""

    @abstractmethod
    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        """Everything held, in compute dtype: k, v (B, Hkv, T, D) and positions."""

    @abstractmethod
    def keep(self, idx: Tensor) -> None:
        """Keep only tokens ``idx`` (B, T') for whole rows or (B, Hkv, T') per head, in that order."""

    @abstractmethod
    def tensors(self) -> list[Tensor]:
        """The tensors actually held (views of the used part of any buffer)."""

    def reserved_tensors(self) -> list[Tensor]:
        """Whole allocations, including spare capacity. Default: same as ``tensors``."""
        return self.tensors()

    @property
    @abstractmethod
    def length(self) -> int:
        """Tokens held per row (and head)."""

    @abstractmethod
    def positions(self) -> Tensor:
        """Positions of held tokens, (B, T) or (B, Hkv, T), without dequantizing anything."""


class GrowingBuffer:
    """A (B, H, capacity, *rest) tensor that doubles its capacity along dim 2 when full."""

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
        """Overwrite the held part with ``x`` (fewer or re-ordered tokens, maybe more heads)."""
        if self.data is None or x.shape[1] != self.data.shape[1] or x.shape[2] > self.data.shape[2]:
            self.data, self.length = None, 0
            self.append(x)
            return
        self.data[:, :, : x.shape[2]] = x
        self.length = x.shape[2]


def append_positions(buffer: GrowingBuffer, pos: Tensor) -> None:
    """Append positions (B, T) as int32 to a (B, 1 or Hkv, T) buffer (per head once eviction split the heads)."""
    p = pos.to(torch.int32)[:, None]
    if buffer.data is not None and buffer.data.shape[1] > 1:
        p = p.expand(-1, buffer.data.shape[1], -1)
    buffer.append(p)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Select tokens along dim 2 of x (B, H, T, ...) with idx (B, T') or (B, H', T')."""
    if idx.dim() == 2:
        idx = idx[:, None]
    heads = max(x.shape[1], idx.shape[1])
    x = x.expand(x.shape[0], heads, *x.shape[2:])
    idx = idx.expand(idx.shape[0], heads, idx.shape[2])
    extra = x.shape[3:]
    idx = idx.reshape(*idx.shape, *([1] * len(extra))).expand(*idx.shape, *extra)
    return torch.gather(x, 2, idx)


class DenseStore(TokenStore):
    """Keys and values as they arrive (the model's dtype), positions as int32."""

    def __init__(self) -> None:
        self.k, self.v, self.pos = GrowingBuffer(), GrowingBuffer(), GrowingBuffer()

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.k.append(k)
        self.v.append(v)
        append_positions(self.pos, pos)

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.k.view(), self.v.view(), self.positions()

    def positions(self) -> Tensor:
        p = self.pos.view()
        return p[:, 0] if p.shape[1] == 1 else p

    def keep(self, idx: Tensor) -> None:
        self.k.replace(gather_tokens(self.k.view(), idx))
        self.v.replace(gather_tokens(self.v.view(), idx))
        self.pos.replace(gather_tokens(self.pos.view(), idx))

    def tensors(self) -> list[Tensor]:
        return [b.view() for b in (self.k, self.v, self.pos) if b.data is not None]

    def reserved_tensors(self) -> list[Tensor]:
        return [b.data for b in (self.k, self.v, self.pos) if b.data is not None]

    @property
    def length(self) -> int:
        return self.k.length


# -- registry: ``storage=<name>`` anywhere a strategy takes a storage ----------------------------
StoreFactory = Callable[[], TokenStore]
STORAGES: dict[str, Callable[..., TokenStore]] = {"dense": DenseStore}


def register_storage(name: str):
    """Class decorator: make a TokenStore available as ``storage=<name>``."""

    def wrap(cls):
        STORAGES[name] = cls
        return cls

    return wrap


def storage_factory(name: str, **params) -> StoreFactory:
    """A zero-argument factory for the named storage; unknown names list the valid ones.

    Building one store here validates the settings at once, before any model loads.
    """
    from kvcompress.cache import storages  # noqa: F401  (registers every built-in storage)

    if name not in STORAGES:
        raise ValueError(f"unknown storage {name!r}; valid choices: {', '.join(sorted(STORAGES))}")
    cls = STORAGES[name]
    cls(**params)
    return lambda: cls(**params)
