"""``storage=fp8``: keys and values as 1-byte float8 codes (e4m3 or e5m2), the KV format of vLLM and SGLang, with a
scale per tensor, per KV head or per token (vLLM's granularities).

A stored entry is ``fp8(x / s)`` (saturating: an entry beyond the format's max, 448 for e4m3 and 57344 for e5m2,
is clamped), read back as ``fp8 * s``. ``scale``:

* ``token``: s = absmax / max of that token's head vector, an fp16 part per token and head (2 bytes per head_dim
  entries); needs no calibration.
* ``head`` / ``tensor``: one fp32 s per layer and KV head / per layer, for keys and values apart, a *calibrated*
  absmax / max (the calibration text's largest entry; for post-RoPE keys the largest norm of a rotate-half pair,
  which bounds the entry at every position; see ``formats.calibrated_absmax``), held as calibration tensors.
  Not a running absmax: a scale that moved with the history would tie a token's codes to its neighbours. An
  uncalibrated store uses s = 1 (vLLM's default when no scales are given); entries past the calibrated range
  saturate.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.checks import one_of
from kvcompress.cache.storage.frontier.formats import FP8, FP8_MAX, TINY, FloatCodeStore, to_fp8
from kvcompress.kernels import Packed

SCALES = ("token", "head", "tensor")


class Fp8Store(FloatCodeStore):
    def __init__(self, format: str = "e4m3", scale: str = "token", keys: str = "post_rope"):
        self.format = one_of("storage.format", format, tuple(FP8))
        self.scale = one_of("storage.scale", scale, SCALES)
        super().__init__(keys)  # scales: per layer {"k": (1, H|1, 1, 1), "v": ...}

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        def scale(amax: Tensor) -> Tensor:
            amax = amax if self.scale == "head" else amax.amax(0, keepdim=True)
            return (amax / FP8_MAX[self.format]).clamp_min(TINY).float()[None, :, None, None]

        if self.scale != "token":
            self.calibrate_scales(ctx, scale)

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        parts = {}
        for name, x in (("k", k), ("v", v)):
            x = x.float()
            if self.scale == "token":
                s = (x.abs().amax(-1, keepdim=True) / FP8_MAX[self.format]).clamp_min(TINY).half()
                parts[name + "_scale"] = s
            else:
                s = self.calibrated_scale(name, x)
            parts[name] = to_fp8(x / s.float(), self.format)
        return parts

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        out = []
        for name in ("k", "v"):
            s = parts[name + "_scale"].float() if self.scale == "token" else self.calibrated_scale(name, parts[name])
            out.append((parts[name].float() * s).to(dtype))
        return out[0], out[1]

    def packed(self, parts: dict[str, Tensor], name: str) -> Packed:
        """Side ``name`` as the kernel reads it: the float8 bytes and one scale per token and head (a per-head or
        per-tensor scale expanded over tokens, not copied)."""
        codes = parts[name].view(torch.uint8)
        B, H, T, D = codes.shape
        s = parts[name + "_scale"] if self.scale == "token" else self.calibrated_scale(name, codes).reshape(1, -1, 1, 1)
        return Packed(codes, s.expand(B, H, T, 1), bits=8, group_size=D, fmt=self.format)

    def report(self) -> dict[str, float | str]:
        source = "token absmax" if self.scale == "token" else ("calibrated absmax" if self.scales else "1.0")
        return {"fp8_scale_source": source}
