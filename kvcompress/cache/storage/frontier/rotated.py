"""``storage=rotated``: rotation before quantization (QuaRot, Ashkboos et al., 2024; TurboQuant, Zandieh et al., 2025;
KVLinC): each head vector is multiplied by an orthogonal R (D x D) before a per-token codec stores it, and by R^T
when read. A Hadamard (or seeded random orthogonal) R spreads an outlier channel over every channel, so per-token
groups see a flatter distribution and their scales waste fewer levels.

``transform``: ``hadamard`` (Sylvester, normalised by 1/sqrt(D); D a power of two) or ``random`` (QR of a seeded
Gaussian matrix). ``rotate``: ``k``, ``v`` or ``kv``. ``codec``: the inner per-token codec, ``int`` (asymmetric
groups of ``group_size`` channels, fp16 scale and zero, ``key_bits`` / ``value_bits`` in 8/4/2), ``nvfp4`` /
``mxfp4`` (``fp4``) or ``fp8`` (e4m3, a per-token scale). Any codec composes: R acts on the token's own vector.
With ``keys=pre_rope`` R is applied before RoPE (read: decode, R^T, then RoPE at the stored positions). KIVI's
per-channel keys behind a residual are not a per-token codec: ``rotated_kivi`` composes the same ``Rotation`` with them.

Attention (post-RoPE keys, a decode step): (q R)(k R)^T = q k^T, so the query is rotated once instead of
un-rotating every held key, and with rotated values the output is rotated back once: o = softmax(.)(V R) R^T.
Per step that is 2 D x D products per query head (O(Hq D^2)), independent of the context length, where
decode-then-attend would rotate all T held keys (O(T Hkv D^2)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import ModelSpec, visibility_mask
from kvcompress.cache.checks import int_at_least, one_of
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.frontier.fp4 import Fp4Store
from kvcompress.cache.storage.frontier.fp8 import Fp8Store
from kvcompress.cache.storage.quant.quantizer import QTensor, QuantConfig, dequantize, quantize

TRANSFORMS, SIDES, CODECS = ("hadamard", "random"), ("k", "v", "kv"), ("int", "nvfp4", "mxfp4", "fp8")


class IntTokenCodec(CodecStore):
    """Asymmetric per-token integer groups (``quant.quantizer``) as a codec: codes, fp16 scale and zero per group."""

    def __init__(self, key_bits: int = 4, value_bits: int = 4, group_size: int = 32, keys: str = "post_rope"):
        self.cfg = {"k": QuantConfig(one_of("storage.key_bits", key_bits, (8, 4, 2)), group_size),
                    "v": QuantConfig(one_of("storage.value_bits", value_bits, (8, 4, 2)), group_size)}
        super().__init__(keys)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        for cfg in self.cfg.values():
            cfg.check_head_dim(spec.head_dim, "storage.group_size")

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        parts = {}
        for name, x in (("k", k), ("v", v)):
            q = quantize(x, self.cfg[name])
            parts |= {name: q.codes, name + "_scale": q.scale, name + "_zero": q.zero}
        return parts

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        return tuple(dequantize(QTensor(parts[n], parts[n + "_scale"], parts[n + "_zero"]), self.cfg[n], dtype)
                     for n in ("k", "v"))


def orthogonal(kind: str, dim: int, seed: int) -> Tensor:
    """A D x D orthogonal matrix (fp32): normalised Sylvester Hadamard, or Q of a seeded Gaussian's QR."""
    if kind == "hadamard":
        h = torch.ones(1, 1)
        while h.shape[0] < dim:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(dim)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: Haar-distributed


class Rotation:
    """The rotation of a rotated storage: ``transform``, ``rotate`` (sides) and ``seed`` settings, R built at
    ``check`` (``build_rotation``) and ``turn`` (x R, or x R^T back). Shared by ``RotatedStore`` (per-token codecs) and
    ``rotated_kivi.RotatedQuantizedStore`` (KIVI's per-channel keys behind a residual)."""

    def rotation(self, transform: str, rotate: str, seed: int) -> None:
        self.transform = one_of("storage.transform", transform, TRANSFORMS)
        self.rotate = one_of("storage.rotate", rotate, SIDES)
        self.seed = int_at_least("storage.seed", seed, 0)
        self.matrix: Tensor | None = None

    def build_rotation(self, head_dim: int) -> None:
        if self.transform == "hadamard" and head_dim & (head_dim - 1):
            raise ValueError(f"storage.transform=hadamard needs head_dim a power of two, got {head_dim}; use random")
        self.matrix = orthogonal(self.transform, head_dim, self.seed)

    def turn(self, x: Tensor, side: str, back: bool = False) -> Tensor:
        """x R (or x R^T with ``back``) where ``side`` is rotated, in fp32."""
        if side not in self.rotate:
            return x.float()
        if self.matrix.device != x.device:
            self.matrix = self.matrix.to(x.device)
        return x.float() @ (self.matrix.T if back else self.matrix)


class RotatedContext:
    """The calibration context as the inner codec sees it: rotated samples (R has no RoPE pair structure, so a
    key entry is bounded by its vector's norm)."""

    def __init__(self, ctx, store: RotatedStore):
        self.ctx, self.store = ctx, store
        self.key_bound = "norm" if "k" in store.rotate and store.keys == "post_rope" else None

    def __getattr__(self, name):
        return getattr(self.ctx, name)

    def kv_samples(self):
        return [(self.store.turn(k, "k"), self.store.turn(v, "v"), pos)
                for k, v, pos in self.ctx.kv_samples()]


class RotatedStore(Rotation, CodecStore):
    def __init__(self, codec: str = "int", transform: str = "hadamard", rotate: str = "kv", key_bits: int = 4,
                 value_bits: int = 4, group_size: int = 32, seed: int = 0, keys: str = "post_rope"):
        self.codec = one_of("storage.codec", codec, CODECS)
        self.rotation(transform, rotate, seed)
        if codec == "int":
            self.inner = IntTokenCodec(key_bits, value_bits, int_at_least("storage.group_size", group_size, 1), keys)
        elif codec == "fp8":
            self.inner = Fp8Store("e4m3", "token", keys)
        else:
            self.inner = Fp4Store(codec, keys)
        super().__init__(keys)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        self.build_rotation(spec.head_dim)
        self.inner.check(spec)

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        self.inner.calibrate(RotatedContext(ctx, self))

    def fresh(self, layer: int) -> RotatedStore:
        store = super().fresh(layer)
        store.inner = self.inner.fresh(layer)
        return store

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        return self.inner.encode(self.turn(k, "k"), self.turn(v, "v"))

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        k, v = self.inner.decode(parts, torch.float32)
        return self.turn(k, "k", back=True).to(dtype), self.turn(v, "v", back=True).to(dtype)

    def attend_packed(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, parts: dict[str, Tensor],
                      lengths: Tensor | None = None) -> Tensor | None:
        """A decode step's attention in the rotated space: the query turned by R, the output turned back by R^T (see
        module). Multi-token steps decode and attend (as the eager store does), so both forms agree there."""
        if q.shape[2] > 1:
            return None
        k, v = self.inner.decode(parts, q.dtype)
        qr = self.turn(q, "k").to(q.dtype)
        groups = q.shape[1] // k.shape[1]
        mask = visibility_mask(q_pos, k_pos, groups)
        out = F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, enable_gqa=groups > 1)
        return self.turn(out, "v", back=True).to(q.dtype)

    def calibration_tensors(self) -> list[Tensor]:
        return [self.matrix, *self.inner.calibration_tensors()] if self.matrix is not None else []

    def report(self) -> dict[str, float | str]:
        return self.inner.report()
