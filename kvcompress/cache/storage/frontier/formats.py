"""Number formats of the frontier storages: FP8 (e4m3 / e5m2), FP4 e2m1 with its block scales, and the calibrated
absmax that per-tensor and per-head scales use.

FP4 e2m1 (OCP Microscaling Formats v1.0, the element type of MXFP4 and NVFP4): 1 sign, 2 exponent, 1 mantissa bit,
magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, no inf or NaN. A code is ``sign << 3 | magnitude index``; two codes a byte
(low nibble first). Values are rounded to the nearest magnitude (a tie to the smaller) and saturate at 6.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.kernels import Packed, quant_attention
from kvcompress.kernels.reference import pack, unpack

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {name: float(torch.finfo(dt).max) for name, dt in FP8.items()}  # 448, 57344
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest e2m1 magnitude (6 = 1.5 * 2**2): MX's shared exponent subtracts it
TINY = 2.0**-24


def to_fp8(x: Tensor, fmt: str) -> Tensor:
    """Saturating cast of fp32 ``x`` to float8 (torch's cast rounds to nearest even; out of range would be NaN/inf)."""
    m = FP8_MAX[fmt]
    return x.float().clamp(-m, m).to(FP8[fmt])


def e2m1_codes(x: Tensor) -> Tensor:
    """fp32 x (already divided by its scale) -> uint8 codes in [0, 16): nearest e2m1 value, saturating at +-6."""
    grid = torch.tensor(E2M1, device=x.device)
    idx = torch.bucketize(x.abs().clamp_max(E2M1_MAX).contiguous(), (grid[1:] + grid[:-1]) / 2)
    return (idx | ((x < 0).to(idx.dtype) << 3)).to(torch.uint8)


def e2m1_values(codes: Tensor) -> Tensor:
    """uint8 codes -> fp32 e2m1 values."""
    grid = torch.tensor(E2M1, device=codes.device)
    mag = grid[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


def pack_fp4(codes: Tensor) -> Tensor:
    return pack(codes, 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    return unpack(packed, 4)


def e8m0_exponent(amax: Tensor) -> Tensor:
    """MX shared scale exponent of a block: floor(log2(amax)) - emax(e2m1), in [-127, 127] (amax 0: -127)."""
    e = torch.floor(torch.log2(amax.float().clamp_min(2.0**-127))) - E2M1_EMAX
    return e.clamp(-127, 127)


def calibrated_absmax(x: Tensor, key_bound: str) -> Tensor:
    """Per KV head absmax (Hkv,) of calibration samples x (1, Hkv, N, D).

    ``key_bound``: "value" (the entries themselves: values, pre-RoPE keys), "pair" (post-RoPE keys: a rotate-half
    RoPE turns channels c and c + D/2 together, so no rotated entry exceeds that pair's norm at any position), or
    "norm" (keys under any further orthogonal transform: no entry exceeds the vector's norm)."""
    x = x.float()[0]
    if key_bound == "pair":
        half = x.shape[-1] // 2
        x = (x[..., :half].square() + x[..., half:].square()).sqrt()
    elif key_bound == "norm":
        x = x.norm(dim=-1)
    return x.abs().flatten(1).amax(1)


def attend_codes(q: Tensor, q_pos: Tensor, k_pos: Tensor, k: Packed, v: Packed, lengths: Tensor | None) -> Tensor:
    """The fp8 / fp4 stores' ``attend_packed`` where ``kernels.resolve`` picks Triton: decode attention read straight
    from the float codes (``kernels.triton_fp``); ``lengths`` (captured form: 0-d, the slots written) is read on the
    device, so only held slots are read and the launch can be captured. Elsewhere the stores return None: their
    ``decode``, then attention, which is the kernel's reference."""
    n = None if lengths is None else lengths.view(1).to(torch.int32)
    return quant_attention(q, q_pos, k_pos, k, v, backend="triton", lengths=None if n is None else n.repeat(3))
