"""Triton decoders of the float codes the decode-attention kernel (``triton_attention``) reads in its tiles: FP8
(e4m3 / e5m2, one byte) and FP4 e2m1 (a nibble) with the block scales of NVFP4 (e4m3 times an fp32 tensor scale)
and MXFP4 (e8m0, a power of two; OCP Microscaling Formats v1.0).

Bit patterns are decoded arithmetically, exactly, into fp32 (every value of these formats is an fp32 value), and
the scale is applied in the order of the codec's ``decode`` (``cache.storage.frontier.fp8`` / ``fp4``), so the
tile equals the decoded tokens bit for bit before both are rounded to the query's dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

FMT_IDS = {"int": 0, "e4m3": 1, "e5m2": 2, "nvfp4": 3, "mxfp4": 4}  # the kernel's FMT constexpr


@triton.jit
def minifloat(bits, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr):
    """int32 bit pattern (sign at bit EXP + MAN) -> fp32: (-1)^s 2^(e - BIAS) (1 + m 2^-MAN) for e > 0, and the
    subnormals (-1)^s 2^(1 - BIAS - MAN) m for e = 0. e4m3 = (4, 3, 7) (its NaN, e = 15 and m = 7, is never stored:
    the codec saturates at 448), e5m2 = (5, 2, 15) (inf / NaN likewise), e2m1 = (2, 1, 1). The powers of two are
    built as fp32 exponent fields, so no rounding happens."""
    e = (bits >> MAN) & ((1 << EXP) - 1)
    m = bits & ((1 << MAN) - 1)
    normal = (((e + (127 - BIAS)) << 23) | (m << (23 - MAN))).to(tl.float32, bitcast=True)
    ulp = ((e * 0 + (128 - BIAS - MAN)) << 23).to(tl.float32, bitcast=True)  # 2^(1 - BIAS - MAN)
    mag = tl.where(e == 0, m.to(tl.float32) * ulp, normal)
    return tl.where(((bits >> (EXP + MAN)) & 1) == 1, -mag, mag)


@triton.jit
def e8m0(bits):
    """MX shared-scale byte (int32) -> 2^(bits - 127) in fp32; byte 0 is 2^-127, an fp32 subnormal (bit 22)."""
    return tl.where(bits == 0, 1 << 22, bits << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp_values(code, s, OUTER, FMT: tl.constexpr):
    """fp32 entries of codes ``code`` (int32) with their group's loaded scale ``s``, as the codec decodes them:
    fp8 ``value * s``; nvfp4 ``e2m1 * (e4m3(s) * outer)`` (``OUTER``: the 0-d fp32 tensor scale); mxfp4
    ``e2m1 * 2^(s - 127)``."""
    if FMT == 1:
        val = minifloat(code, 4, 3, 7) * s.to(tl.float32)
    elif FMT == 2:
        val = minifloat(code, 5, 2, 15) * s.to(tl.float32)
    elif FMT == 3:
        val = minifloat(code, 2, 1, 1) * (minifloat(s.to(tl.int32), 4, 3, 7) * tl.load(OUTER))
    else:
        val = minifloat(code, 2, 1, 1) * e8m0(s.to(tl.int32))
    return val
