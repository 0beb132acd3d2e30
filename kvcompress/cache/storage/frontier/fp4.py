"""``storage=fp4``: microscaled FP4 keys and values, e2m1 codes packed two a byte (``formats``), one scale per block
of consecutive channels of a token's head vector.

* ``nvfp4`` (NVIDIA Blackwell's NVFP4): blocks of 16, each with an e4m3 (float8) scale, times one fp32 scale per
  layer and side. Block scale ``s_b = e4m3(amax_block / 6 / s_t)``, entry ``e2m1(x / (s_b s_t))``; 4.5 bits per
  entry. The fp32 tensor scale is calibrated: ``s_t = amax / (448 * 6)`` with amax the calibration text's largest
  entry (post-RoPE keys bounded by their rotate-half pair norms, as ``fp8``), so the block scales use e4m3's range;
  uncalibrated, s_t = 1. A calibrated, not running, tensor scale keeps a token's codes its own.
* ``mxfp4`` (OCP Microscaling v1.0): blocks of 32, a shared power-of-two scale ``2**e`` stored as its e8m0 byte
  (e + 127), ``e = floor(log2 amax_block) - 2`` (2: the exponent of e2m1's largest value, 6); the block's largest
  entries may saturate at 6 * 2**e. 4.25 bits per entry, no calibration.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.checks import one_of
from kvcompress.cache.storage.frontier.formats import (
    E2M1_MAX,
    FP8_MAX,
    TINY,
    FloatCodeStore,
    e2m1_codes,
    e2m1_values,
    e8m0_exponent,
    to_fp8,
)
from kvcompress.kernels import Packed
from kvcompress.kernels.reference import pack, unpack

BLOCK = {"nvfp4": 16, "mxfp4": 32}


class Fp4Store(FloatCodeStore):
    def __init__(self, format: str = "nvfp4", keys: str = "post_rope"):
        self.format = one_of("storage.format", format, tuple(BLOCK))
        self.block = BLOCK[self.format]
        super().__init__(keys)  # scales (nvfp4): per layer {"k": 0-d fp32, "v": ...}

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if spec.head_dim % self.block:
            raise ValueError(f"storage.format={self.format} scales blocks of {self.block} channels: head_dim must be "
                             f"a multiple of {self.block}, got {spec.head_dim}")

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        if self.format == "nvfp4":
            self.calibrate_scales(ctx,
                                  lambda amax: (amax.amax() / (FP8_MAX["e4m3"] * E2M1_MAX)).clamp_min(TINY).float())

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        parts = {}
        for name, x in (("k", k), ("v", v)):
            g = x.float().unflatten(-1, (-1, self.block))  # (B, H, T, D / block, block)
            amax = g.abs().amax(-1)
            if self.format == "nvfp4":
                st = self.calibrated_scale(name, x)
                sb = to_fp8(amax / E2M1_MAX / st, "e4m3")
                scale, parts[name + "_scale"] = sb.float() * st, sb
            else:
                e = e8m0_exponent(amax)
                scale, parts[name + "_scale"] = torch.exp2(e), (e + 127).to(torch.uint8)
            scale = torch.where(scale > 0, scale, 1.0)  # an all-zero block: any scale gives code 0
            parts[name] = pack(e2m1_codes(g / scale[..., None]).flatten(-2), 4)
        return parts

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        out = []
        for name in ("k", "v"):
            s = parts[name + "_scale"].float()
            scale = s * self.calibrated_scale(name, s) if self.format == "nvfp4" else torch.exp2(s - 127)
            x = e2m1_values(unpack(parts[name], 4)).unflatten(-1, (-1, self.block)) * scale[..., None]
            out.append(x.flatten(-2).to(dtype))
        return out[0], out[1]

    def packed(self, parts: dict[str, Tensor], name: str) -> Packed:
        """Side ``name`` as the kernel reads it: the e2m1 nibbles and the block scales' bytes (nvfp4: e4m3, with the
        fp32 tensor scale; mxfp4: e8m0)."""
        codes, s = parts[name], parts[name + "_scale"].view(torch.uint8)
        outer = self.calibrated_scale(name, codes).reshape(()).float() if self.format == "nvfp4" else None
        return Packed(codes, s, bits=4, group_size=self.block, fmt=self.format, outer=outer)
