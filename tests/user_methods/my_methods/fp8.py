import torch

from kvcompress.cache.storage.codec import CodecStore

E4M3_MAX = 448.0


class Fp8Store(CodecStore):
    """K and V as float8 e4m3 with one fp16 scale per token and head (absmax / 448)."""

    def encode(self, k, v):
        parts = {}
        for name, x in (("k", k), ("v", v)):
            scale = (x.float().abs().amax(-1, keepdim=True) / E4M3_MAX).clamp_min(2**-24).half()
            parts[name] = (x.float() / scale.float()).to(torch.float8_e4m3fn)
            parts[name + "_scale"] = scale
        return parts

    def decode(self, parts, dtype):
        return tuple((parts[n].float() * parts[n + "_scale"].float()).to(dtype) for n in ("k", "v"))
