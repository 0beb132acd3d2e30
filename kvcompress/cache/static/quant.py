"""Quantized K/V in static-capacity buffers."""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.static.dense import StaticKVCache
from kvcompress.kernels import Packed, quant_attention, quantize_tokens, resolve


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
