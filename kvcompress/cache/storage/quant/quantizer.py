"""Group-wise integer quantization (8, 4 or 2 bits) with bit packing and fp16 scales / zero points.

Tensors are (B, H, T, D). A group is either ``group_size`` consecutive channels of one token
(``axis="token"``) or ``group_size`` consecutive tokens of one channel (``axis="channel"``, KIVI keys).

Asymmetric: ``zero`` is the group minimum rounded *down* to fp16 and ``scale`` is
``(max - zero) / (2**bits - 1)`` rounded *up* to fp16, so every value maps inside the code range
and ``|x - dequant(x)| <= scale / 2``. Symmetric: ``scale = absmax / (2**(bits-1) - 1)`` rounded up,
codes in ``[-qmax, qmax]`` stored with an offset, no zero point, same ``scale / 2`` bound.
Codes are packed ``8 // bits`` per byte along the channel dimension (``kernels.reference.pack``: the one
packing, shared with the kernels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kvcompress.kernels.reference import TINY as _TINY
from kvcompress.kernels.reference import pack, round_fp16, unpack

Axis = Literal["token", "channel"]
BITS = (2, 4, 8)
AXES = ("token", "channel")


@dataclass(frozen=True)
class QuantConfig:
    """How one of K or V is quantized."""

    bits: int = 4
    group_size: int = 64
    axis: Axis = "token"
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"storage.bits must be one of {BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"storage.group_size must be a positive integer, got {self.group_size!r}")
        if self.axis not in AXES:
            raise ValueError(f"storage.key_axis / value_axis must be one of {AXES}, got {self.axis!r}")

    def check_head_dim(self, head_dim: int, name: str = "group_size") -> None:
        per_byte = 8 // self.bits
        if head_dim % per_byte:
            raise ValueError(f"head_dim={head_dim} must be a multiple of {per_byte} to pack {self.bits}-bit codes")
        if self.axis == "token" and head_dim % self.group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ValueError(f"{name}={self.group_size} must divide head_dim={head_dim} for per-token groups; "
                             f"valid: {divisors}")

    @property
    def token_granularity(self) -> int:
        """Tokens that must be present before they can be quantized together."""
        return self.group_size if self.axis == "channel" else 1

    def bits_per_value(self) -> float:
        """Theory: code bits plus the fp16 scale (and zero) amortised over a group."""
        return self.bits + (16 if self.symmetric else 32) / self.group_size


@dataclass
class QTensor:
    """Packed codes (B, H, T, D * bits / 8) uint8 and fp16 ``scale`` / ``zero`` per group.

    Per-token groups: scale (B, H, T, D / g). Per-channel groups: scale (B, H, T / g, D).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None


def _grouped(x: Tensor, cfg: QuantConfig) -> tuple[Tensor, int]:
    """View x (B, H, T, D) as groups, and the dim to reduce over."""
    if cfg.axis == "token":
        return x.unflatten(-1, (-1, cfg.group_size)), -1  # (B, H, T, D/g, g)
    return x.unflatten(2, (-1, cfg.group_size)), 3  # (B, H, T/g, g, D)


def quantize(x: Tensor, cfg: QuantConfig) -> QTensor:
    """Quantize x (B, H, T, D); for per-channel groups T must be a multiple of group_size."""
    g, dim = _grouped(x.float(), cfg)
    if cfg.symmetric:
        qmax = 2 ** (cfg.bits - 1) - 1
        absmax = g.abs().amax(dim, keepdim=True)
        scale = round_fp16(absmax / qmax, up=True).clamp_min(_TINY)
        q = (g / scale.float()).round().clamp(-qmax, qmax) + 2 ** (cfg.bits - 1)
        zero = None
    else:
        levels = 2**cfg.bits - 1
        zero = round_fp16(g.amin(dim, keepdim=True), up=False)
        scale = round_fp16((g.amax(dim, keepdim=True) - zero.float()) / levels, up=True).clamp_min(_TINY)
        q = ((g - zero.float()) / scale.float()).round().clamp(0, levels)
        zero = zero.squeeze(dim)
    codes = q.to(torch.uint8).flatten(-2) if cfg.axis == "token" else q.to(torch.uint8).flatten(2, 3)
    return QTensor(pack(codes, cfg.bits), scale.squeeze(dim), zero)


def dequantize(q: QTensor, cfg: QuantConfig, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """Reconstruct (B, H, T, D) in ``dtype`` (written into ``out`` when given)."""
    codes = unpack(q.codes, cfg.bits)
    dim = -1 if cfg.axis == "token" else 3
    g, _ = _grouped(codes, cfg)
    scale = q.scale.unsqueeze(dim).float()
    if cfg.symmetric:
        x = (g.float() - 2 ** (cfg.bits - 1)) * scale
    else:
        x = torch.addcmul(q.zero.unsqueeze(dim).float(), g.float(), scale)
    x = x.flatten(-2) if cfg.axis == "token" else x.flatten(2, 3)
    if out is None:
        return x.to(dtype)
    out.copy_(x)
    return out


def error_bound(q: QTensor, cfg: QuantConfig) -> Tensor:
    """Per-element worst-case |x - dequant(x)| = scale / 2, broadcast to (B, H, T, D)."""
    s = q.scale.float() / 2
    if cfg.axis == "token":
        return s.repeat_interleave(cfg.group_size, dim=-1)
    return s.repeat_interleave(cfg.group_size, dim=2)
