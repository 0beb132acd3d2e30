"""The storage axis: how one layer's tokens are held.

A ``TokenStore`` holds keys, values and positions of one layer for every batch row. The instance that
Hydra builds (``conf/storage/<name>.yaml``) is a prototype holding settings (and calibration, for
storages that calibrate); ``fresh(layer)`` makes the empty per-layer stores of a batch. The base owns
the positions buffer and the key mode; a storage implements the payload hooks.

Keys arrive before RoPE. ``keys="post_rope"`` (default) rotates them once on arrival;
``keys="pre_rope"`` stores them unrotated and rotates what is read at the stored positions
(KVQuant-style quantization before rotation, latent projection of pre-RoPE keys).
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, ModelSpec, Rotary, attention_tail_weights
from kvcompress.cache.buffers import GrowingBuffer, gather_tokens
from kvcompress.cache.checks import one_of

KEY_MODES = ("post_rope", "pre_rope")


class TokenStore(ABC):
    """One layer's tokens for B rows. Positions are (B, T), or (B, Hkv, T) once heads keep different tokens."""

    ragged_heads = True  # can keep different tokens per KV head (per-head eviction); a property where it depends
    values_writable = True  # ``update_values`` works (token merging: CaM)
    pads_heads = True  # ``keep`` + ``hide`` can hold a different number of tokens per KV head (AdaKV, DuoAttention)
    paged = False  # holds only the real tokens of uneven heads, in pages (codec storages: ``cache.pages``)
    group_calibration = False  # calibrate(ctx, groups) fits one calibration per group of layers (layout=xkv)

    def __init__(self, keys: str = "post_rope"):
        self.keys = one_of("storage.keys", keys, KEY_MODES)
        self.layer = 0
        self.clear()

    # -- lifecycle ---------------------------------------------------------------------------
    def check(self, spec: ModelSpec) -> None:
        """Validate settings against the model's dimensions (before weights load)."""
        self.spec = spec

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        """One-off, data-dependent preparation of every layer's store. Default: none. ``groups`` (from the
        layout's ``calibration_groups``) lists layers whose calibrations are fitted jointly; only storages with
        ``group_calibration`` get groups other than singletons, the rest may ignore it."""

    def fresh(self, layer: int) -> TokenStore:
        """An empty store for ``layer`` with these settings (calibration is shared, not copied)."""
        store = copy.copy(self)
        store.layer = layer
        store.clear()
        return store

    def clear(self) -> None:
        self.pos = GrowingBuffer()
        self.rope: Rotary | None = None
        self.clear_payload()

    # -- tokens ------------------------------------------------------------------------------
    def append(self, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        """Add tokens: pre-RoPE keys k and values v (B, Hkv, T, D) at positions pos (B, T)."""
        self.rope = rope
        self.append_payload(rope.rotate(k, pos) if self.keys == "post_rope" else k, v, pos)
        p = pos.to(torch.int32)[:, None]
        if self.pos.data is not None and self.pos.data.shape[1] > 1:
            p = p.expand(-1, self.pos.data.shape[1], -1)
        self.pos.append(p)

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        """Everything held: rotated keys, values (B, Hkv, T, D) in the model's dtype, and positions."""
        k, v = self.read_payload()
        pos = self.positions()
        return (self.rope.rotate(k, pos) if self.keys == "pre_rope" else k), v, pos

    def attend(self, q: Tensor, q_pos: Tensor, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
        """Attention of rotated queries over everything held; the softmax weights of the last
        ``n_weights`` queries come out of the same pass (for policies that score by attention)."""
        k, v, pos = self.read()
        return attention_tail_weights(q, k.to(q.dtype), v.to(q.dtype), q_pos, pos, n_weights)

    def keep(self, idx: Tensor) -> None:
        """Keep only tokens ``idx`` (B, T') for whole rows or (B, Hkv, T') per head, in that order."""
        self.keep_payload(idx)
        self.pos.replace(gather_tokens(self.pos.view(), idx))

    def update_values(self, v: Tensor) -> None:
        """Hold values ``v`` (B, Hkv, T, D) for the held tokens instead (token merging: CaM). Default: re-encode the
        payload from the keys as stored and the new values; a storage may write them in place."""
        k, _ = self.read_payload()
        pos = self.positions()
        self.clear_payload()
        self.append_payload(k, v.to(k.dtype), pos)

    def hide(self, valid: Tensor) -> None:
        """Make held slots where ``valid`` (B, T) or (B, H, T) is False invisible (padding of ragged rows)."""
        p = self.pos.view()
        self.pos.replace(torch.where(valid if valid.dim() == 3 else valid[:, None], p, PAD_POSITION))

    def positions(self) -> Tensor:
        p = self.pos.view()
        return p[:, 0] if p.shape[1] == 1 else p

    @property
    def length(self) -> int:
        """Token slots held per row (and head)."""
        return self.pos.length

    # -- accounting: the real tensors, never a formula ----------------------------------------
    def tensors(self) -> list[Tensor]:
        """Every tensor held for the batch (views of the used part of any buffer)."""
        return self.pos.tensors() + self.payload_tensors()

    def reserved_tensors(self) -> list[Tensor]:
        """Whole allocations, spare capacity included."""
        return self.pos.reserved() + self.payload_reserved()

    def calibration_tensors(self) -> list[Tensor]:
        """One-off tensors (projections, codebooks), reported apart from the per-batch bytes."""
        return []

    def static_form(self, capacity: int):
        """A whole static-capacity cache equivalent to this storage alone (captured decode), or None."""
        return None

    def report(self) -> dict[str, float | str]:
        """Storage-specific figures for the record (ranks, calibration file, effective group sizes)."""
        return {}

    # -- what a storage implements ------------------------------------------------------------
    @abstractmethod
    def clear_payload(self) -> None:
        """Drop all tokens."""

    @abstractmethod
    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Store keys (rotated or not, by ``keys``) and values."""

    @abstractmethod
    def read_payload(self) -> tuple[Tensor, Tensor]:
        """Keys (as stored) and values of every held token, in the model's dtype."""

    @abstractmethod
    def keep_payload(self, idx: Tensor) -> None:
        """Gather the payload with keep indices (see ``keep``)."""

    @abstractmethod
    def payload_tensors(self) -> list[Tensor]: ...

    def payload_reserved(self) -> list[Tensor]:
        return self.payload_tensors()

