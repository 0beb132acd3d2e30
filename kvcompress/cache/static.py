"""Static-capacity caches: dense, and per-token quantized, in buffers allocated once (the captured-decode form).

Every buffer is allocated once (at the first append after ``reset`` of a new batch size, in the
arriving keys' dtype and device) to ``capacity`` tokens: the payload (dense K/V (L, B, Hkv, capacity,
D), or packed codes and scales), positions (B, capacity) filled with ``PAD_POSITION`` (invisible to
every real query), and a write index, a 0-d device tensor; later resets clear them in place, so
addresses stay fixed. A forward advances the index by its T tokens in place (at the first layer) and
every layer writes them to slots ``index - T + [0, T)`` with ``index_copy_``, so a step has fixed
shapes, no host synchronisation and no Python branch on data: the whole step (embedding to logits)
can be recorded once and replayed (``kvcompress.engine.static``). Attention runs over the capacity with the
mask ``key_pos <= query_pos`` (empty slots are masked), so the result equals the growing cache's. A storage
offers its static form through ``static_form(capacity)``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary
from kvcompress.kernels import Packed, quant_attention, quantize_tokens, resolve


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


class StaticQuantKVCache(StaticKVCache):
    """Per-token ``bits``-bit K and V in fixed buffers: packed codes (L, B, Hkv, capacity, D * bits / 8) and fp16
    scale (and zero) (L, B, Hkv, capacity, D / g), exactly the quantized storage's codes (per-token groups, no
    residual; tokens cast to ``residual_dtype`` first, as it does). New tokens are quantized on append
    (``kernels.quantize_tokens``) and attention reads the codes (``kernels.quant_attention``): with Triton only
    the held tokens' bytes, their count read on the device; the reference reads the capacity, empty slots masked.
    """

    def __init__(self, capacity: int, bits: int = 4, group_size: int = 64, symmetric: bool = False,
                 residual_dtype: torch.dtype | None = torch.float16, device: torch.device | str | None = None,
                 backend: str | None = None):
        super().__init__(capacity, device=device)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.residual_dtype, self.backend = residual_dtype, backend

    def setup(self, spec: ModelSpec) -> None:
        D = spec.head_dim
        if self.bits not in (2, 4, 8) or D % self.group_size or D % (8 // self.bits):
            raise ValueError(f"bits={self.bits} must be 2, 4 or 8 and group_size={self.group_size} divide "
                             f"head_dim={D}")
        super().setup(spec)

    def payload(self) -> list[Tensor]:
        return [t for t in (self.k, self.v, self.ks, self.vs, self.kz, self.vz) if t is not None]

    def allocate_payload(self, dtype: torch.dtype, device: torch.device) -> None:
        s = self.spec
        lead = (s.num_layers, self.batch_size, s.num_kv_heads, self.capacity)
        codes = (*lead, s.head_dim * self.bits // 8)
        groups = (*lead, s.head_dim // self.group_size)
        self.k, self.v = (torch.zeros(codes, dtype=torch.uint8, device=device) for _ in range(2))
        self.ks, self.vs = (torch.zeros(groups, dtype=torch.float16, device=device) for _ in range(2))
        self.kz = self.vz = None
        if not self.symmetric:
            self.kz, self.vz = (torch.zeros(groups, dtype=torch.float16, device=device) for _ in range(2))

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        for x, codes, scale, zero in ((k, self.k, self.ks, self.kz), (v, self.v, self.vs, self.vz)):
            x = x if self.residual_dtype is None else x.to(self.residual_dtype)  # None: as it arrives (model)
            c, s, z = quantize_tokens(x, self.bits, self.group_size, self.symmetric, self.backend)
            codes[layer].index_copy_(2, slots, c)
            scale[layer].index_copy_(2, slots, s)
            if zero is not None:
                zero[layer].index_copy_(2, slots, z)

    def side(self, codes: Tensor, scale: Tensor, zero: Tensor | None) -> Packed:
        return Packed(codes, scale, zero, None, self.bits, self.group_size, "token")

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        k = self.side(self.k[layer], self.ks[layer], None if self.kz is None else self.kz[layer])
        v = self.side(self.v[layer], self.vs[layer], None if self.vz is None else self.vz[layer])
        lengths = None
        if resolve(q.device, self.backend) == "triton":
            lengths = self.index.to(torch.int32).repeat(3)  # [n_q of K, n_q of V, T]: all held tokens are codes
        return quant_attention(q, q_pos, self.pos, k, v, backend=self.backend, lengths=lengths)
