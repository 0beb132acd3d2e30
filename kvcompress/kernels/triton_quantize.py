"""Triton quantize-on-append: per-token groups of new tokens -> packed codes + fp16 scale/zero, bit for bit
the quantizer's (fp32 maths with correctly rounded division, round-half-even, fp16 rounded outwards).

Outward fp16 rounding without ``nextafter``: ``h = rtne(x)``; if ``h`` lies on the wrong side of ``x``,
step its bit pattern one ulp: up (scales are >= 0) is ``bits + 1``; down is ``bits - 1`` for h > 0 and
``bits + 1`` for h <= -0 (sign-magnitude). Group sizes and D / g must be powers of two here; the
dispatcher sends other shapes to the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _fp16_out(x, UP: tl.constexpr):
    h = tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16, fp_downcast_rounding="rtne")
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    if UP:
        bits = tl.where(h.to(tl.float32) < x, bits + 1, bits)
    else:
        step = tl.where(bits > 0, bits - 1, bits + 1)
        bits = tl.where(h.to(tl.float32) > x, step, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _rint(y):
    """Round half to even (torch.round), exact for |y| < 2**23."""
    f = tl.floor(y)
    d = y - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def _quantize(X, CODES, SCALE, ZERO, N, x_sn, BITS: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr,
              SYM: tl.constexpr, BLOCK_N: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    gi, ci = tl.arange(0, NG), tl.arange(0, GROUP)
    off = n[:, None, None] * x_sn + gi[None, :, None] * GROUP + ci[None, None, :]
    x = tl.load(X + off, mask=nmask[:, None, None], other=0.0).to(tl.float32)  # (BN, NG, G)
    soff = n[:, None] * NG + gi[None, :]
    smask = nmask[:, None]
    if SYM:
        qmax: tl.constexpr = (1 << (BITS - 1)) - 1
        scale = tl.maximum(_fp16_out(tl.math.div_rn(tl.max(tl.abs(x), 2), float(qmax)), True), 2.0**-24)
        y = tl.math.div_rn(x, scale.to(tl.float32)[:, :, None])
        q = tl.minimum(tl.maximum(_rint(y), -qmax), qmax) + (1 << (BITS - 1))
    else:
        levels: tl.constexpr = (1 << BITS) - 1
        zero = _fp16_out(tl.min(x, 2), False)
        z = zero.to(tl.float32)
        scale = tl.maximum(_fp16_out(tl.math.div_rn(tl.max(x, 2) - z, float(levels)), True), 2.0**-24)
        y = tl.math.div_rn(x - z[:, :, None], scale.to(tl.float32)[:, :, None])
        q = tl.minimum(tl.maximum(_rint(y), 0.0), float(levels))
        tl.store(ZERO + soff, zero, mask=smask)
    tl.store(SCALE + soff, scale.to(tl.float16), mask=smask)
    PER: tl.constexpr = 8 // BITS
    c = tl.reshape(q.to(tl.int32), (BLOCK_N, NG * GROUP // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    packed = tl.sum(c << shifts[None, None, :], 2)
    b = tl.arange(0, NG * GROUP // PER)
    tl.store(CODES + n[:, None] * (NG * GROUP // PER) + b[None, :], packed.to(tl.uint8), mask=nmask[:, None])


def supported(dim: int, group_size: int) -> bool:
    pow2 = triton.next_power_of_2
    return dim % group_size == 0 and pow2(group_size) == group_size and pow2(dim // group_size) == dim // group_size


def quantize_tokens(x: Tensor, bits: int, group_size: int, symmetric: bool,
                    block_n: int = 16) -> tuple[Tensor, Tensor, Tensor | None]:
    """Same contract as ``reference.quantize_tokens``."""
    lead, D = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, D)
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    N, NG = flat.shape[0], D // group_size
    codes = torch.empty((N, D * bits // 8), device=x.device, dtype=torch.uint8)
    scale = torch.empty((N, NG), device=x.device, dtype=torch.float16)
    zero = None if symmetric else torch.empty_like(scale)
    _quantize[(triton.cdiv(N, block_n),)](flat, codes, scale, scale if zero is None else zero, N, flat.stride(0),
                                          BITS=bits, GROUP=group_size, NG=NG, SYM=symmetric, BLOCK_N=block_n)
    return (codes.view(*lead, -1), scale.view(*lead, NG), None if zero is None else zero.view(*lead, NG))
