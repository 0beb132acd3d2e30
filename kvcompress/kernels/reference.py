"""PyTorch references of the kernels, with the kernels' semantics (and the CPU path).

Attention over a side longer than ``chunk`` tokens is computed chunk by chunk with an online softmax, so
the reference never holds full-precision K/V for more than ``chunk`` tokens at once:
``m = max_t s_t``, ``l = sum_t exp(s_t - m)``, ``acc = sum_t exp(s_t - m) v_t``, ``out = acc / l``,
merged across chunks by rescaling with ``exp(m_old - m_new)``. Scores are ``q . k * scale`` in fp32 with
K/V first rounded to the query's dtype (as a dequantize-then-attend path does).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.kernels.layout import Packed

FLOOR = -1e30  # finite running-max floor: a chunk where a row sees nothing adds exp(-inf) = 0, never NaN
TINY = 2.0**-24  # smallest positive fp16, the scale floor of the quantizer


def unpack(packed: Tensor, bits: int) -> Tensor:
    """(..., D * bits / 8) uint8 -> codes (..., D), low bits first."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


def pack(codes: Tensor, bits: int) -> Tensor:
    """codes (..., D) < 2**bits -> (..., D * bits / 8) uint8, low bits first."""
    if bits == 8:
        return codes
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (codes.unflatten(-1, (-1, 8 // bits)) << shifts).sum(-1, dtype=torch.uint8)


def dequant_prefix(side: Packed, lo: int, hi: int) -> Tensor:
    """Prefix tokens [lo, hi) in fp32: ``zero + code * scale`` or ``(code - 2**(bits-1)) * scale``, per group
    (per-channel groups need lo and hi on group boundaries)."""
    if side.fmt != "int":
        raise ValueError(f"Packed fmt={side.fmt!r}: float codes are decoded by their codec (cache.storage.frontier), "
                         "not here; attend over the decoded tokens (dense sides) instead")
    g, codes = side.group_size, unpack(side.codes[:, :, lo:hi], side.bits)
    if side.axis == "token":
        grouped, at = codes.unflatten(-1, (-1, g)), (slice(lo, hi), Ellipsis, None)
    else:
        grouped, at = codes.unflatten(2, (-1, g)), (slice(lo // g, hi // g), None, Ellipsis)
    scale = side.scale[(slice(None), slice(None), *at)].float()
    if side.symmetric:
        x = (grouped.float() - 2 ** (side.bits - 1)) * scale
    else:
        x = torch.addcmul(side.zero[(slice(None), slice(None), *at)].float(), grouped.float(), scale)
    return x.flatten(-2) if side.axis == "token" else x.flatten(2, 3)


def side_tokens(side: Packed, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
    """Tokens [lo, hi) of a side, (B, H, hi - lo, D) in ``dtype`` (as a dequantize-then-attend path holds them)."""
    parts, n_q = [], side.n_q
    if lo < n_q:
        parts.append(dequant_prefix(side, lo, min(hi, n_q)).to(dtype))
    if hi > n_q:
        parts.append(side.res[:, :, max(lo - n_q, 0): hi - n_q].to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def row_positions(q_pos: Tensor, rows: int) -> Tensor:
    """Query rows are (head-in-group, token) flattened token-fastest: row m is query token m % Tq."""
    Tq = q_pos.shape[1]
    return q_pos[:, torch.arange(rows, device=q_pos.device) % Tq]


def aligned_chunk(chunk: int, *sides: Packed) -> int:
    """``chunk`` rounded down to whole per-channel groups of every side (at least one group)."""
    g = math.lcm(*(s.group_size for s in sides if s.codes is not None and s.axis == "channel"), 1)
    return max(chunk // g, 1) * g


def trim(side: Packed, n_q: int, length: int) -> Packed:
    """The first ``n_q`` prefix tokens and ``length - n_q`` residual tokens of capacity buffers."""
    if side.codes is None:
        return Packed(res=side.res[:, :, :length])
    rows = n_q if side.axis == "token" else n_q // side.group_size
    zero = None if side.zero is None else side.zero[:, :, :rows]
    res = side.res[:, :, : length - n_q] if length > n_q else None
    return replace(side, codes=side.codes[:, :, :n_q], scale=side.scale[:, :, :rows], zero=zero, res=res)


def attend_rows(rows: Tensor, q_pos: Tensor, k_pos: Tensor, k: Packed, v: Packed, scale: float,
                chunk: int = 4096, lengths: Tensor | None = None) -> Tensor:
    """rows (B, G, M, Dk) over sides with G heads; k_pos (B, T) or (B, G, T). Returns (B, G, M, Dv).

    Up to ``chunk`` tokens: one scaled-dot-product attention over the dequantized tokens (the eager path's
    cost and rounding); longer histories: chunk by chunk with the online softmax, in fp32. ``lengths``
    (n_q of K, n_q of V, T) on the device: the sides are capacity buffers holding that many tokens.
    """
    if lengths is not None:
        n_qk, n_qv, T = (int(x) for x in lengths.tolist())
        k, v, k_pos = trim(k, n_qk, T), trim(v, n_qv, T), k_pos[..., :T]
    B, G, M, _ = rows.shape
    T, dtype = k.length, rows.dtype
    qp = row_positions(q_pos, M)[:, None, :, None]  # (B, 1, M, 1)
    kp = (k_pos if k_pos.dim() == 3 else k_pos[:, None])[:, :, None]  # (B, 1|G, 1, T)
    chunk = aligned_chunk(chunk, k, v)
    if T <= chunk:
        return F.scaled_dot_product_attention(rows, side_tokens(k, 0, T, dtype), side_tokens(v, 0, T, dtype),
                                              attn_mask=kp <= qp, scale=scale)
    q = rows.float()
    m = torch.full((B, G, M, 1), FLOOR, device=rows.device)
    norm = torch.zeros_like(m)
    acc = torch.zeros((B, G, M, v.dim), device=rows.device)
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        s = (q @ side_tokens(k, lo, hi, dtype).float().transpose(-1, -2)) * scale
        s = s.masked_fill(kp[..., lo:hi] > qp, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = torch.exp(s - m_new)
        alpha = torch.exp(m - m_new)
        norm = norm * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p @ side_tokens(v, lo, hi, dtype).float()
        m = m_new
    return (acc / norm).to(dtype)


def round_fp16(x: Tensor, up: bool) -> Tensor:
    """fp32 -> fp16 rounded towards +inf (``up``) or -inf, as the quantizer does: the nearest fp16, stepped one ulp
    by its bit pattern where it lies on the wrong side of x (sign-magnitude: a step away from zero is bits + 1;
    from +-0 it is +-2^-24), as ``triton_quantize._fp16_out`` does. Not ``torch.nextafter``: Inductor's fp16
    ``nextafter`` returns its input (torch 2.13, CPU)."""
    h = x.clamp(-65504.0, 65504.0).half()
    off = (h.float() < x) if up else (h.float() > x)
    bits = h.view(torch.int16).to(torch.int32)
    step = torch.where((h > 0) if up else (h < 0), bits + 1, bits - 1)
    step = torch.where(h == 0, torch.full_like(bits, 1 if up else -32767), step)  # 0x0001 / 0x8001 as int16
    return torch.where(off, step, bits).to(torch.int16).view(torch.float16)


def quantize_groups(g: Tensor, dim: int, bits: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Unpacked uint8 codes, fp16 scale and zero of groups of ``g`` (fp32) reduced over ``dim``.

    Asymmetric: ``zero = down(min)``, ``scale = max(up((max - zero) / (2**bits - 1)), 2**-24)``,
    ``code = clamp(rint((x - zero) / scale), 0, 2**bits - 1)``. Symmetric: ``scale = max(up(absmax / qmax),
    2**-24)``, ``code = clamp(rint(x / scale), -qmax, qmax) + 2**(bits-1)`` with ``qmax = 2**(bits-1) - 1``.
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = round_fp16(g.abs().amax(dim, keepdim=True) / qmax, True).clamp_min(TINY)
        q = (g / scale.float()).round().clamp(-qmax, qmax) + 2 ** (bits - 1)
        zero = None
    else:
        levels = 2**bits - 1
        zero = round_fp16(g.amin(dim, keepdim=True), False)
        scale = round_fp16((g.amax(dim, keepdim=True) - zero.float()) / levels, True).clamp_min(TINY)
        q = ((g - zero.float()) / scale.float()).round().clamp(0, levels)
        zero = zero.squeeze(dim)
    return q.to(torch.uint8), scale.squeeze(dim), zero


def quantize_tokens(x: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token groups of ``group_size`` channels of x (..., D): packed codes, fp16 scale and zero (..., D / g)."""
    q, scale, zero = quantize_groups(x.float().unflatten(-1, (-1, group_size)), -1, bits, symmetric)
    return pack(q.flatten(-2), bits), scale, zero
