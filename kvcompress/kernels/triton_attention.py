"""Triton decode attention over a quantized prefix + full-precision residual (or dense latents).

One program per (batch row, KV head, token split) streams its tokens in blocks of BLOCK_T: it loads
the packed bytes, unpacks ``(byte >> (d % per) * bits) & mask``, dequantizes with the group's fp16
scale/zero in registers, and keeps an online softmax (m, l, acc) for the query rows of its head
(GQA: all query heads of a KV head, and all query tokens, are rows of one tile). Nothing but the
bytes held is read; full-precision K/V never exist outside a BLOCK_T tile. Splits (flash-decoding)
are merged by a second small kernel: ``out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s``.

Split s always covers tokens [s * SPLIT_TOKENS, (s + 1) * SPLIT_TOKENS): the boundaries do not depend on T (the
capacity in the captured form, the held count in eager), so both run the same programs over the same held tokens.
A split past the held tokens is empty (m_s = -1e30, l_s = 0, acc_s = 0) and weighs e^(-1e30 - m) = 0 exactly in
the merge, so it adds exact zeros: captured equals eager bit for bit. Fixed-size partitions as in vLLM's
PagedAttention V2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvcompress.kernels.layout import Packed
from kvcompress.kernels.triton_fp import FMT_IDS, fp_values


@triton.jit
def _side_tile(C, S, Z, R, c_sb, c_sh, c_st, s_sb, s_sh, s_st, r_sb, r_sh, r_st,
               b, h, t, d, n_q, tmask, dmask, OUT_TY: tl.constexpr,
               BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr, SYM: tl.constexpr, FMT: tl.constexpr):
    """Tokens t (BT,) x channels d (BD,) of one side in fp32, rounded to OUT_TY as a dequantize would. FMT 0: int
    codes; else float codes (``triton_fp``), Z then points at nvfp4's tensor scale."""
    in_r = (t >= n_q) & tmask
    roff = b * r_sb + h * r_sh + (t - n_q)[:, None] * r_st + d[None, :]
    x = tl.load(R + roff, mask=in_r[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if BITS > 0:
        qm = ((t < n_q) & tmask)[:, None] & dmask[None, :]
        coff = b * c_sb + h * c_sh + t[:, None] * c_st + (d // (8 // BITS))[None, :]
        byte = tl.load(C + coff, mask=qm, other=0).to(tl.int32)
        code = (byte >> ((d % (8 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)
        if AXIS == 0:  # per-token groups: scale (B, H, T, D / g)
            soff = b * s_sb + h * s_sh + t[:, None] * s_st + (d // GROUP)[None, :]
        else:  # per-channel groups: scale (B, H, T / g, D)
            soff = b * s_sb + h * s_sh + (t // GROUP)[:, None] * s_st + d[None, :]
        s = tl.load(S + soff, mask=qm, other=0)
        if FMT > 0:
            val = fp_values(code, s, Z, FMT)
        elif SYM:
            val = (code.to(tl.float32) - (1 << (BITS - 1))) * s.to(tl.float32)
        else:
            val = tl.load(Z + soff, mask=qm, other=0.0).to(tl.float32) + code.to(tl.float32) * s.to(tl.float32)
        x = tl.where(qm, val, x)
    return x.to(OUT_TY).to(tl.float32)


@triton.jit
def _decode_attn(Q, QPOS, KPOS, ACC, MX, LS, LENS,
                 KC, KS, KZ, KR, VC, VS, VZ, VR,
                 q_sb, q_sh, q_sm, qp_sb, kp_sb, kp_sh,
                 kc_sb, kc_sh, kc_st, ks_sb, ks_sh, ks_st, kr_sb, kr_sh, kr_st,
                 vc_sb, vc_sh, vc_st, vs_sb, vs_sh, vs_st, vr_sb, vr_sh, vr_st,
                 H, M, TQ, T, n_qk, n_qv, per_split, n_split, sm_scale, DK, DV,
                 K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_AXIS: tl.constexpr, K_SYM: tl.constexpr,
                 K_FMT: tl.constexpr,
                 V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_AXIS: tl.constexpr, V_SYM: tl.constexpr,
                 V_FMT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                 PREC: tl.constexpr, DEV_LEN: tl.constexpr):
    if DEV_LEN:  # lengths read on the device: one compiled (or captured) launch serves every step
        n_qk, n_qv, T = tl.load(LENS), tl.load(LENS + 1), tl.load(LENS + 2)
    pid, split = tl.program_id(0), tl.program_id(1)
    b, h = pid // H, pid % H
    m = tl.arange(0, BLOCK_M)
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    mmask, dkmask, dvmask = m < M, dk < DK, dv < DV
    q = tl.load(Q + b * q_sb + h * q_sh + m[:, None] * q_sm + dk[None, :], mask=mmask[:, None] & dkmask[None, :],
                other=0.0)
    out_ty = q.dtype
    q = q.to(tl.float32)
    qpos = tl.load(QPOS + b * qp_sb + m % TQ, mask=mmask, other=0)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    start = split * per_split
    end = tl.minimum(start + per_split, T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        k = _side_tile(KC, KS, KZ, KR, kc_sb, kc_sh, kc_st, ks_sb, ks_sh, ks_st, kr_sb, kr_sh, kr_st,
                       b, h, t, dk, n_qk, tmask, dkmask, out_ty, K_BITS, K_GROUP, K_AXIS, K_SYM, K_FMT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        kpos = tl.load(KPOS + b * kp_sb + h * kp_sh + t, mask=tmask, other=0)
        visible = (kpos[None, :] <= qpos[:, None]) & tmask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _side_tile(VC, VS, VZ, VR, vc_sb, vc_sh, vc_st, vs_sb, vs_sh, vs_st, vr_sb, vr_sh, vr_st,
                       b, h, t, dv, n_qv, tmask, dvmask, out_ty, V_BITS, V_GROUP, V_AXIS, V_SYM, V_FMT)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    row = (pid * n_split + split) * M + m
    tl.store(MX + row, m_i, mask=mmask)
    tl.store(LS + row, l_i, mask=mmask)
    tl.store(ACC + row[:, None] * DV + dv[None, :], acc, mask=mmask[:, None] & dvmask[None, :])


@triton.jit
def _combine(ACC, MX, LS, OUT, n_split, M, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the splits of one (row, head): out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s. An empty split
    (m_s = -1e30, l_s = 0, acc_s = 0) gets weight e^(-1e30 - m) = 0 for a row that sees any token: exact zeros."""
    pid = tl.program_id(0)
    m, dv = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_DV)
    mmask = m < M
    top = tl.full([BLOCK_M], -1e30, tl.float32)
    for s in range(n_split):
        top = tl.maximum(top, tl.load(MX + (pid * n_split + s) * M + m, mask=mmask, other=-1e30))
    num = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    for s in range(n_split):
        row = (pid * n_split + s) * M + m
        w = tl.exp(tl.load(MX + row, mask=mmask, other=-1e30) - top)
        den += w * tl.load(LS + row, mask=mmask, other=0.0)
        acc = tl.load(ACC + row[:, None] * DV + dv[None, :], mask=mmask[:, None] & (dv < DV)[None, :], other=0.0)
        num += w[:, None] * acc
    out = num / tl.where(mmask, den, 1.0)[:, None]  # padding rows: no 0 / 0
    tl.store(OUT + (pid * M + m[:, None]) * DV + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=mmask[:, None] & (dv < DV)[None, :])


SPLIT_TOKENS = 256  # tokens per flash-decoding split: 4 blocks of 64, independent of T (see the module doc)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _side_args(side: Packed, like: Tensor) -> tuple[list, tuple]:
    """Pointers + (b, h, t) strides of codes, scale (zero shares them) and residual; unused ones are dummies. A
    float-code scale keeps its strides (a per-head / per-tensor scale comes expanded, zero strides); the zero
    pointer is then nvfp4's tensor scale."""
    def last_contig(x: Tensor | None) -> Tensor:
        return like if x is None else (x if x.stride(-1) == 1 else x.contiguous())
    codes, res = last_contig(side.codes), last_contig(side.res)
    scale = last_contig(side.scale)
    scale = scale.contiguous() if side.fmt == "int" else scale
    zero = side.outer if side.fmt == "nvfp4" else (scale if side.zero is None else side.zero.contiguous())
    ptrs = [codes, scale, zero, res]
    strides = (*codes.stride()[:3], *scale.stride()[:3], *res.stride()[:3])
    consts = (side.bits if side.codes is not None else 0, side.group_size, 0 if side.axis == "token" else 1,
              side.codes is not None and side.symmetric, FMT_IDS[side.fmt] if side.codes is not None else 0)
    return ptrs + list(strides), consts


def attend_rows(rows: Tensor, q_pos: Tensor, k_pos: Tensor, k: Packed, v: Packed, scale: float,
                block_t: int = 64, split_tokens: int = SPLIT_TOKENS, lengths: Tensor | None = None) -> Tensor:
    """Same contract as ``reference.attend_rows``: rows (B, G, M, Dk) -> (B, G, M, Dv). ``split_tokens``: tokens
    per split, a multiple of ``block_t`` (a power of two, at least 16). ``lengths``: see ``ops.quant_attention``;
    the launch then depends only on the buffers' capacities, so it can be captured in a CUDA graph."""
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t!r}")
    if split_tokens <= 0 or split_tokens % block_t:
        raise ValueError(f"split_tokens must be a positive multiple of block_t={block_t}, got {split_tokens!r}")
    B, G, M, DK = rows.shape
    T, DV, dev = max(k.length, v.length), v.dim, rows.device
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    q_pos = q_pos.contiguous()
    kp = k_pos.contiguous()
    kp_strides = (kp.stride(0), kp.stride(1)) if kp.dim() == 3 else (kp.stride(0), 0)
    n_split = max(1, triton.cdiv(T, split_tokens))  # T: the capacity when ``lengths`` is given
    acc = torch.empty((B, G, n_split, M, DV), device=dev, dtype=torch.float32)
    mx = torch.empty((B, G, n_split, M), device=dev, dtype=torch.float32)
    ls = torch.empty_like(mx)
    k_args, k_const = _side_args(k, rows)
    v_args, v_const = _side_args(v, rows)
    _decode_attn[(B * G, n_split)](
        rows, q_pos, kp, acc, mx, ls, q_pos if lengths is None else lengths.to(torch.int32).contiguous(),
        *k_args[:4], *v_args[:4],
        rows.stride(0), rows.stride(1), rows.stride(2), q_pos.stride(0), *kp_strides,
        *k_args[4:], *v_args[4:],
        G, M, q_pos.shape[1], T, k.n_q, v.n_q, split_tokens, n_split, scale, DK, DV,
        *k_const, *v_const,
        BLOCK_M=_block(M), BLOCK_T=block_t, BLOCK_DK=_block(DK), BLOCK_DV=_block(DV),
        PREC="ieee" if rows.dtype == torch.float32 else "tf32", DEV_LEN=lengths is not None)
    out = torch.empty((B, G, M, DV), device=dev, dtype=rows.dtype)
    _combine[(B * G,)](acc, mx, ls, out, n_split, M, DV, BLOCK_M=_block(M), BLOCK_DV=_block(DV))
    return out
