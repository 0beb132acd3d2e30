"""What the kernels read: one of K or V as a quantized prefix plus a full-precision residual.

The layout is the quantized storage's, unchanged: ``codes`` (B, H, Tq, D * bits / 8) uint8, ``bits``-bit
codes packed ``8 // bits`` per byte along D, low bits first; fp16 ``scale`` / ``zero`` per group, shaped
(B, H, Tq, D / g) for per-token groups and (B, H, Tq / g, D) for per-channel groups (KIVI keys);
symmetric groups have no zero and store ``code = round(x / s) + 2**(bits-1)``. Token ``t`` of the side is
prefix token ``t`` when ``t < Tq``, else residual token ``t - Tq``; a dense side has only the residual.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

AXES = ("token", "channel")


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

    def __post_init__(self) -> None:
        if self.codes is None and self.res is None:
            raise ValueError("Packed needs codes or a residual")
        if self.codes is not None and (self.bits not in (2, 4, 8) or self.scale is None):
            raise ValueError(f"Packed codes need bits in (2, 4, 8) and a scale, got bits={self.bits!r}")
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

