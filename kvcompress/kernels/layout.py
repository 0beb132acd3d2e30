"""What the kernels read: one of K or V as a quantized prefix plus a full-precision residual.

The layout is the quantized storage's, unchanged: ``codes`` (B, H, Tq, D * bits / 8) uint8, ``bits``-bit
codes packed ``8 // bits`` per byte along D, low bits first; fp16 ``scale`` / ``zero`` per group, shaped
(B, H, Tq, D / g) for per-token groups and (B, H, Tq / g, D) for per-channel groups (KIVI keys);
symmetric groups have no zero and store ``code = round(x / s) + 2**(bits-1)``. Token ``t`` of the side is
prefix token ``t`` when ``t < Tq``, else residual token ``t - Tq``; a dense side has only the residual.

Float codes (``fmt`` other than ``int``; ``triton_fp``): ``e4m3`` / ``e5m2`` bytes (float8 viewed as uint8) with a
scale per group of ``group_size`` channels (fp16 or fp32; a per-head or per-tensor scale is passed expanded, zero
strides), ``nvfp4`` / ``mxfp4`` e2m1 nibbles (two a byte) with a uint8 block scale (e4m3 times the fp32 0-d
``outer`` tensor scale, or e8m0). Only the Triton kernel reads them; their reference is the codec's own decode.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

AXES = ("token", "channel")
FORMATS = {"int": (2, 4, 8), "e4m3": (8,), "e5m2": (8,), "nvfp4": (4,), "mxfp4": (4,)}  # -> bits allowed


@dataclass(frozen=True)
class Packed:
    """Packed codes, fp16 scale (and zero) of the quantized prefix, then ``res`` (B, H, R, D)."""

    codes: Tensor | None = None
    scale: Tensor | None = None
    zero: Tensor | None = None
    res: Tensor | None = None
    bits: int = 0  # 0: no quantized prefix (a dense side)
    group_size: int = 1
    axis: str = "token"
    fmt: str = "int"
    outer: Tensor | None = None  # nvfp4: the fp32 tensor scale (0-d)

    def __post_init__(self) -> None:
        if self.codes is None and self.res is None:
            raise ValueError("Packed needs codes or a residual")
        if self.codes is not None and (self.bits not in (2, 4, 8) or self.scale is None):
            raise ValueError(f"Packed codes need bits in (2, 4, 8) and a scale, got bits={self.bits!r}")
        if self.fmt not in FORMATS or (self.codes is not None and self.bits not in FORMATS[self.fmt]):
            raise ValueError(f"Packed fmt must be one of {tuple(FORMATS)} with bits in its {FORMATS.get(self.fmt)}, "
                             f"got fmt={self.fmt!r}, bits={self.bits!r}")
        if (self.fmt == "nvfp4") != (self.outer is not None):
            raise ValueError("Packed needs the fp32 tensor scale ``outer`` exactly when fmt='nvfp4'")
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {self.axis!r}")

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def n_q(self) -> int:
        """Tokens in the quantized prefix."""
        return 0 if self.codes is None else self.codes.shape[2]

    @property
    def length(self) -> int:
        return self.n_q + (0 if self.res is None else self.res.shape[2])

    @property
    def heads(self) -> int:
        return (self.codes if self.codes is not None else self.res).shape[1]

    @property
    def dim(self) -> int:
        if self.codes is not None:
            return self.codes.shape[-1] * (8 // self.bits)
        return self.res.shape[-1]


def dense(x: Tensor) -> Packed:
    """A side held in full precision only (plain K/V, or latents)."""
    return Packed(res=x)

