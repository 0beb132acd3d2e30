"""Group-wise integer codes (``quantizer``) as codecs: ``QuantSide`` codes one of K or V (a ``GroupCodec`` of the
residual stage: per-token groups code each token alone, per-channel groups ``group_size`` tokens together), and
``TokenQuantStore`` is int8 / int4 / int2 with per-token groups and no residual, a per-token codec
(``storage.codec``).

Per-token groups are quantized through ``kernels.quantize_tokens`` (Triton on CUDA, bit for bit the reference),
per-channel groups through ``quantizer.quantize``. Parts: packed ``codes`` (B, H, T, D * bits / 8) uint8, fp16
``scale`` (and ``zero``) (B, H, T, D / g) per token or (B, H, T / g, D) per channel. A decode step attends over the
codes (``kernels.quant_attention``); in fixed slots with Triton the launch reads the slot count on the device, with
the reference every slot is dequantized and empty slots are masked.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.quant.quantizer import QTensor, QuantConfig, dequantize, quantize
from kvcompress.cache.storage.residual import GroupCodec
from kvcompress.kernels import Packed, dense, quant_attention, quantize_tokens, resolve

SIDES = ("key", "value")


class QuantSide(GroupCodec):
    """One of K or V in groups of ``cfg``: groups of ``cfg.token_granularity`` tokens."""

    def __init__(self, cfg: QuantConfig, backend: str | None = None):
        self.cfg, self.backend, self.gran = cfg, backend, cfg.token_granularity

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        c = self.cfg
        if c.axis == "token":
            codes, scale, zero = quantize_tokens(x, c.bits, c.group_size, c.symmetric, self.backend)
        else:
            codes, scale, zero = quantize(x, c)
        return {"codes": codes, "scale": scale} | ({} if zero is None else {"zero": zero})

    def packed(self, parts: dict[str, Tensor], res: Tensor | None = None) -> Packed:
        if "codes" not in parts:
            return Packed(res=res)
        c = self.cfg
        return Packed(parts["codes"], parts["scale"], parts.get("zero"), res, c.bits, c.group_size, c.axis)

    def decode(self, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return dequantize(QTensor(parts["codes"], parts["scale"], parts.get("zero")), self.cfg, dtype)


class TokenQuantStore(CodecStore):
    """K and V in per-token groups (``configs[side].axis == "token"``), quantized from ``residual_dtype`` (None: the
    model's dtype). Made by ``QuantizedStore`` when it has no residual and no per-channel groups."""

    def __init__(self, configs: dict[str, QuantConfig], residual_dtype: torch.dtype | None = torch.float16,
                 keys: str = "post_rope", backend: str | None = None):
        if any(cfg.axis != "token" for cfg in configs.values()):
            raise ValueError("per-channel groups span tokens: not a per-token codec (a residual stage holds them)")
        self.configs, self.residual_dtype, self.backend = configs, residual_dtype, backend
        self.sides = {side: QuantSide(cfg, backend) for side, cfg in configs.items()}
        super().__init__(keys)

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        parts = {}
        for side, x in zip(SIDES, (k, v), strict=True):
            coded = self.sides[side].encode(x.to(self.residual_dtype or x.dtype))
            parts |= {f"{side}_{name}": t for name, t in coded.items()}
        return parts

    def side(self, parts: dict[str, Tensor], side: str) -> dict[str, Tensor]:
        return {name[len(side) + 1 :]: t for name, t in parts.items() if name.startswith(side + "_")}

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        return tuple(self.sides[s].decode(self.side(parts, s), dtype) for s in SIDES)

    def attend_packed(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, parts: dict[str, Tensor],
                      lengths: Tensor | None = None) -> Tensor:
        k, v = (self.sides[s].packed(self.side(parts, s)) for s in SIDES)
        if lengths is None:
            return quant_attention(q, q_pos, k_pos, k, v, backend=self.backend)
        if resolve(q.device, self.backend) == "triton":  # [n_q of K, n_q of V, T]: every held slot is a code
            n = lengths.view(1).to(torch.int32)
            return quant_attention(q, q_pos, k_pos, k, v, lengths=torch.cat([n, n, n]), backend=self.backend)
        kk, vv = self.decode(parts, q.dtype)
        return quant_attention(q, q_pos, k_pos, dense(kk), dense(vv), backend=self.backend)
