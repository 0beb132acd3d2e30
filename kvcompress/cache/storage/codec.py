"""A storage written as a codec: how one token's key and value are packed, nothing about where they are held.

Subclass ``CodecStore`` and implement two methods (optionally a third):

* ``encode(k, v) -> dict[str, Tensor]``: the packed form of T tokens, k and v (B, Hkv, T, D) (keys already
  rotated under the default ``keys="post_rope"``). Every tensor is per token: (B, H, T, ...) with H = Hkv or 1,
  any dtype (float8 included), any trailing dims. A token's parts may depend only on that token (and on
  settings or calibration), never on its neighbours: that is what lets a buffer gather, evict and write
  tokens at any slot without asking the storage.
* ``decode(parts, dtype) -> (k, v)``: the tokens back, (B, Hkv, T, D) in ``dtype``, from parts as ``encode``
  returned them (T any number of tokens, possibly gathered or padded slots).
* ``attend_packed(q, q_pos, k_pos, parts, lengths) -> Tensor | None`` (optional): attention output (B, Hq, Tq, D)
  read straight from the packed parts (a kernel, ``kvcompress.kernels.quant_attention``); None (the default)
  means decode then attend. ``lengths`` is None eagerly; in the captured form it is a 0-d device tensor, the
  number of slots written (the rest of the capacity is empty, its positions ``PAD_POSITION``).

The storage never implements a buffer (``cache.buffers``): eagerly its parts grow in ``GrowingParts`` (gathered on
eviction, memory freed after it) and move into ``PagedParts`` (``cache.pages``; ``page_size = None`` stays padded)
once a keep leaves KV heads with different token counts; the captured (static-capacity) form holds them in
``SlotParts`` (``storage.fixed.FixedSlotCache``), as does an eviction policy's static form
(``cache.policy.captured``), each layer with its own codec. Both decode paths and the byte accounting (the parts'
real tensors) come for free.

A complete fp8 (e4m3) per-token storage and its YAML: ``tests/user_methods/my_methods/fp8.py`` and
``tests/user_methods/my_conf/storage/fp8.yaml`` (which ``tests/user_methods`` run through the contract).

Settings are constructor arguments (call ``super().__init__(keys)`` last); validate them against the model in
``check(spec)``. A storage whose tokens are not independent (KIVI's per-channel groups, GEAR's blocks) is a codec
behind a full-precision residual stage (``storage.residual``), not a codec alone.
"""
from __future__ import annotations

from abc import abstractmethod

from torch import Tensor

from kvcompress.cache import base
from kvcompress.cache.buffers import GrowingParts
from kvcompress.cache.pages import PagedParts, PagedPositions
from kvcompress.cache.storage.base import TokenStore
from kvcompress.cache.storage.fixed import FixedSlotCache


class CodecStore(TokenStore):
    """A storage that is only a codec (see the module docstring); the buffers, eviction and both decode paths are
    generic."""

    page_size: int | None = 16  # tokens per page once KV heads keep different counts; None: stay padded

    @abstractmethod
    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Packed per-token parts (B, H, T, ...) of keys and values (B, Hkv, T, D)."""

    @abstractmethod
    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        """Keys and values (B, Hkv, T, D) in ``dtype`` from packed parts."""

    def encode_at(self, k: Tensor, v: Tensor, pos: Tensor) -> dict[str, Tensor]:
        """``encode`` of tokens at positions ``pos`` (B, T), keys as stored; what both buffers call. A codec that
        rotates part of a pre-RoPE key itself (the latent storage's decoupled RoPE dims, with ``self.rope``)
        overrides it."""
        return self.encode(k, v)

    def decode_at(self, parts: dict[str, Tensor], dtype, pos: Tensor | None) -> tuple[Tensor, Tensor]:
        """``decode`` with the keys as attention reads them: pre-RoPE keys rotated at key positions ``pos`` (None:
        as stored). A codec that stores part of a pre-RoPE key rotated (the latent storage) overrides it."""
        k, v = self.decode(parts, dtype)
        return (self.rope.rotate(k, pos) if pos is not None and self.keys == "pre_rope" else k), v

    def attend_packed(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, parts: dict[str, Tensor],
                      lengths: Tensor | None = None) -> Tensor | None:
        """Attention over the packed parts (a kernel), or None: decode, then attend."""
        return None

    # -- the TokenStore hooks, once for every codec --------------------------------------------------------
    def clear_payload(self) -> None:
        self.parts = GrowingParts()
        self.dtype = None

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.dtype = k.dtype
        self.parts.append(self.encode_at(k, v, pos))

    def read_payload(self) -> tuple[Tensor, Tensor]:
        return self.decode(self.parts.view(), self.dtype)

    def keep_payload(self, idx: Tensor) -> None:
        self.parts.keep(idx)

    # -- the buffer: growing, then paged (``cache.pages``) from the first keep that leaves heads uneven ----------
    @property
    def paged(self) -> bool:
        return isinstance(self.parts, PagedParts)

    def append(self, k: Tensor, v: Tensor, pos: Tensor, rope) -> None:
        if not self.paged:
            return super().append(k, v, pos, rope)
        self.rope = rope
        self.parts.append(self.encode_at(rope.rotate(k, pos) if self.keys == "post_rope" else k, v, pos), pos)

    def keep(self, idx: Tensor) -> None:
        if self.paged:
            return self.parts.keep(idx)
        super().keep(idx)

    def hide(self, valid: Tensor) -> None:
        """Hide slots; a per-head ``valid`` (heads keep different counts: AdaKV, DuoAttention, per-head global
        budgets) moves the store into pages of ``page_size`` tokens, which hold only the real tokens, once the
        pages, sum over (row, head) of ceil(n / page_size) * page_size slots, are fewer than the padded view's."""
        if self.paged:
            return self.parts.hide(valid)
        super().hide(valid)
        if self.page_size is None or valid.dim() != 3 or valid.shape[1] == 1:
            return
        page = self.page_size
        if not (isinstance(page, int) and page >= 1):
            raise ValueError(f"storage page_size must be an integer >= 1 or None, got {page!r}")
        pos = self.pos.view()
        counts = (pos < base.PAD_POSITION).sum(-1)
        if int(((counts + page - 1) // page).sum()) * page < pos.numel():
            self.parts = PagedParts(self.parts.view(), pos, page)
            self.pos = PagedPositions(self.parts)

    def update_values(self, v: Tensor) -> None:
        if not self.paged:
            return super().update_values(v)
        k, _ = self.read_payload()
        for name, x in self.encode(k, v.to(k.dtype)).items():
            self.parts.replace(name, x)

    def payload_tensors(self) -> list[Tensor]:
        return self.parts.tensors()

    def payload_reserved(self) -> list[Tensor]:
        return self.parts.reserved()

    def attend(self, q: Tensor, q_pos: Tensor, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
        """One computation of the output whether or not weights are wanted (the packed kernel where the codec has
        one and keys are stored rotated, else decode + ``attention``); the last ``n_weights`` queries' softmax
        weights are computed beside it."""
        out = None
        if self.keys == "post_rope" and not self.decodes_for_attention(q):
            out = self.attend_packed(q, q_pos, self.positions(), self.parts.view())
        if out is None:
            return super().attend(q, q_pos, n_weights)
        if not n_weights:
            return out, None
        k, _, pos = self.read()
        return out, base.tail_weights(q, k.to(q.dtype), q_pos, pos, n_weights)

    def decodes_for_attention(self, q: Tensor) -> bool:
        """True where decode + attend serves this step even though a kernel exists. Default: multi-token steps
        (prefill chunks), where the kernel's per-row tiles gain nothing."""
        return q.shape[2] > 1

    def static_form(self, capacity: int):
        """This codec in fixed slots (captured decode); stored-unrotated keys (rotated at read) decode eagerly."""
        return FixedSlotCache(self, capacity) if self.keys == "post_rope" else None
