"""Per-token integer codes as a codec (``storage.codec``): int8 / int4 / int2 with groups of channels, no residual.

Each token's K and V are quantized on arrival, independently of every other token (``kernels.quantize_tokens``:
Triton on CUDA, bit for bit ``quantizer.quantize`` with per-token groups), after a cast to ``residual_dtype``
(so chunking never changes a code). Parts per side: packed ``codes`` (B, H, T, D * bits / 8) uint8, fp16
``scale`` (and ``zero``) (B, H, T, D / g). A decode step attends over the codes (``kernels.quant_attention``);
in fixed slots with Triton the launch reads the slot count on the device, with the reference every slot is
dequantized and empty slots are masked.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.quant.quantizer import QuantConfig
from kvcompress.kernels import Packed, dense, quant_attention, quantize_tokens, resolve
from kvcompress.kernels.reference import dequant_prefix

SIDES = ("key", "value")


class TokenQuantStore(CodecStore):
    """K and V in per-token groups (``configs[side].axis == "token"``), quantized from ``residual_dtype`` (None: the
    model's dtype). Made by ``QuantizedStore`` when it has no residual and no per-channel groups."""

    def __init__(self, configs: dict[str, QuantConfig], residual_dtype: torch.dtype | None = torch.float16,
                 keys: str = "post_rope", backend: str | None = None):
        if any(cfg.axis != "token" for cfg in configs.values()):
            raise ValueError("per-channel groups span tokens: not a per-token codec (a residual stage holds them)")
        self.configs, self.residual_dtype, self.backend = configs, residual_dtype, backend
        super().__init__(keys)

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        parts = {}
        for side, x in zip(SIDES, (k, v), strict=True):
            cfg = self.configs[side]
            x = x.to(self.residual_dtype or x.dtype)
            codes, scale, zero = quantize_tokens(x, cfg.bits, cfg.group_size, cfg.symmetric, self.backend)
            parts |= {side: codes, f"{side}_scale": scale} | ({} if zero is None else {f"{side}_zero": zero})
        return parts

    def side(self, parts: dict[str, Tensor], side: str) -> Packed:
        cfg = self.configs[side]
        return Packed(parts[side], parts[f"{side}_scale"], parts.get(f"{side}_zero"), None, cfg.bits,
                      cfg.group_size, "token")

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        k, v = (dequant_prefix(self.side(parts, s), 0, parts[s].shape[2]).to(dtype) for s in SIDES)
        return k, v

    def attend_packed(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, parts: dict[str, Tensor],
                      lengths: Tensor | None = None) -> Tensor:
        k, v = self.side(parts, "key"), self.side(parts, "value")
        if lengths is None:
            return quant_attention(q, q_pos, k_pos, k, v, backend=self.backend)
        if resolve(q.device, self.backend) == "triton":  # [n_q of K, n_q of V, T]: every held slot is a code
            n = lengths.view(1).to(torch.int32)
            return quant_attention(q, q_pos, k_pos, k, v, lengths=torch.cat([n, n, n]), backend=self.backend)
        kk, vv = self.decode(parts, q.dtype)
        return quant_attention(q, q_pos, k_pos, dense(kk), dense(vv), backend=self.backend)
