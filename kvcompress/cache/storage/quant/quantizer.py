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
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from kvcompress.kernels.layout import Packed
from kvcompress.kernels.reference import dequant_prefix, pack, quantize_groups, quantize_tokens

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


class QTensor(NamedTuple):
    """Packed codes (B, H, T, D * bits / 8) uint8 and fp16 ``scale`` / ``zero`` per group.

    Per-token groups: scale (B, H, T, D / g). Per-channel groups: scale (B, H, T / g, D).
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None


def quantize(x: Tensor, cfg: QuantConfig) -> QTensor:
    """Quantize x (B, H, T, D); for per-channel groups T must be a multiple of group_size (the kernels' reference
    arithmetic: ``kernels.reference.quantize_groups``)."""
    if cfg.axis == "token":
        return QTensor(*quantize_tokens(x, cfg.bits, cfg.group_size, cfg.symmetric))
    q, scale, zero = quantize_groups(x.float().unflatten(2, (-1, cfg.group_size)), 3, cfg.bits, cfg.symmetric)
    return QTensor(pack(q.flatten(2, 3), cfg.bits), scale, zero)


def dequantize(q: QTensor, cfg: QuantConfig, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruct (B, H, T, D) in ``dtype`` (``kernels.reference.dequant_prefix``)."""
    side = Packed(q.codes, q.scale, q.zero, None, cfg.bits, cfg.group_size, cfg.axis)
    return dequant_prefix(side, 0, q.codes.shape[2]).to(dtype)
