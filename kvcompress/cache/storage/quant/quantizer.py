"""Group-wise integer quantization (8, 4 or 2 bits) with bit packing and fp16 scales / zero points.

Tensors are (B, H, T, D). A group is either ``group_size`` consecutive channels of one token
(``axis="token"``) or ``group_size`` consecutive tokens of one channel (``axis="channel"``, KIVI keys).

Asymmetric: ``zero`` is the group minimum rounded *down* to fp16 and ``scale`` is
``(max - zero) / (2**bits - 1)`` rounded *up* to fp16, so every value maps inside the code range
and ``|x - dequant(x)| <= scale / 2``. Symmetric: ``scale = absmax / (2**(bits-1) - 1)`` rounded up,
codes in ``[-qmax, qmax]`` stored with an offset, no zero point, same ``scale / 2`` bound.
Codes are packed ``8 // bits`` per byte along the channel dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Axis = Literal["token", "channel"]
BITS = (2, 4, 8)
AXES = ("token", "channel")
_TINY = 2.0**-24  # smallest positive fp16: scale floor, so constant groups never divide by zero


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


def pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., D) with values < 2**bits -> (..., D * bits / 8) bytes, low bits first."""
    if bits == 8:
        return codes
    per = 8 // bits
    c = codes.unflatten(-1, (-1, per))
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack``: (..., D * bits / 8) bytes -> uint8 codes (..., D)."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    return ((packed[..., None] >> shifts) & mask).flatten(-2)


def _round_fp16(x: Tensor, direction: float) -> Tensor:
    """Round fp32 ``x`` to fp16 towards ``direction`` (-inf: down, +inf: up)."""
    h = x.clamp(-65504.0, 65504.0).half()
    off = (h.float() > x) if direction < 0 else (h.float() < x)
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction)), h)


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
        scale = _round_fp16(absmax / qmax, float("inf")).clamp_min(_TINY)
        q = (g / scale.float()).round().clamp(-qmax, qmax) + 2 ** (cfg.bits - 1)
        zero = None
    else:
        levels = 2**cfg.bits - 1
        zero = _round_fp16(g.amin(dim, keepdim=True), float("-inf"))
        scale = _round_fp16((g.amax(dim, keepdim=True) - zero.float()) / levels, float("inf")).clamp_min(_TINY)
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
