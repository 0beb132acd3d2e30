"""The kernels' public entry points; each runs the Triton kernel or its PyTorch reference (``dispatch``).

Shapes: queries (B, Hq, Tq, D) rotated; positions q_pos (B, Tq), k_pos (B, T) or per head (B, Hkv, T),
absolute, visibility ``k_pos <= q_pos`` (padding carries a huge position and stays invisible).
GQA: the Hq / Hkv query heads of a KV head and the Tq tokens become the rows of one tile, so each
KV head's bytes are read once per step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.kernels import reference
from kvcompress.kernels.dispatch import resolve
from kvcompress.kernels.layout import Packed, dense


def _attend_rows(rows: Tensor, q_pos: Tensor, k_pos: Tensor, k: Packed, v: Packed, scale: float,
                 backend: str | None, lengths: Tensor | None = None) -> Tensor:
    if resolve(rows.device, backend) == "triton":
        from kvcompress.kernels import triton_attention
        return triton_attention.attend_rows(rows, q_pos, k_pos, k, v, scale, lengths=lengths)
    return reference.attend_rows(rows, q_pos, k_pos, k, v, scale, lengths=lengths)


def quant_attention(q: Tensor, q_pos: Tensor, k_pos: Tensor, k: Packed, v: Packed, scale: float | None = None,
                    backend: str | None = None, lengths: Tensor | None = None) -> Tensor:
    """softmax(q K^T * scale, masked by position) V over packed K/V sides; (B, Hq, Tq, D).

    Equals dequantize-then-``attention`` within fp tolerance; K/V are read as stored (codes, scales, zeros,
    residual), so the bytes moved per step are the bytes held. ``lengths`` (int32 [n_q of K, n_q of V, T] on
    the device) marks the sides as static-capacity buffers of which only that many tokens are held: the
    Triton launch then reads the lengths on the device and can be captured (a static-capacity storage).
    """
    B, Hq, Tq, D = q.shape
    H = k.heads
    rows = q.reshape(B, H, Hq // H * Tq, D)
    out = _attend_rows(rows, q_pos, k_pos, k, v, D**-0.5 if scale is None else scale, backend, lengths)
    return out.reshape(B, Hq, Tq, v.dim)


def latent_attention(qc: Tensor, q_pos: Tensor, k_pos: Tensor, ck: Tensor | Packed, cv: Tensor | Packed,
                     k_basis: Tensor, v_basis: Tensor, v_mean: Tensor, scale: float | None = None,
                     backend: str | None = None, lengths: Tensor | None = None) -> Tensor:
    """Absorbed attention over latents c (B, G, T, r), G = 1 (heads joined) or Hkv.

    ``scores = (q U_k) . c_k`` (the constant ``q . mean_k`` cancels in softmax), ``P = softmax(scores * scale)``,
    ``out = (P c_v) U_v^T + mean_v``. ``k_basis`` (Hkv, d, r_k) and ``v_basis`` (Hkv, d, r_v) are each KV
    head's rows of the bases, ``v_mean`` (Hkv, d). ``scale`` defaults to d**-0.5. Returns (B, Hq, Tq, d).
    ``lengths`` as in ``quant_attention`` (dense latents: ``[0, 0, T]``): the latents are static-capacity buffers
    holding T tokens, read on the device, so the Triton launch can be captured.
    """
    ck = ck if isinstance(ck, Packed) else dense(ck)
    cv = cv if isinstance(cv, Packed) else dense(cv)
    B, Hq, Tq, d = qc.shape
    H, G = k_basis.shape[0], ck.heads
    if G == 1 and k_pos.dim() == 3 and k_pos.shape[1] > 1:
        raise ValueError("latents shared by all heads (G = 1) need positions per row (B, T), not per head")
    qa = torch.einsum("bhtd,hdr->bhtr", qc.reshape(B, H, Hq // H * Tq, d), k_basis.to(qc.dtype))
    rows = qa.reshape(B, G, H // G * Hq // H * Tq, -1)
    mixed = _attend_rows(rows, q_pos, k_pos, ck, cv, d**-0.5 if scale is None else scale, backend, lengths)
    mixed = mixed.reshape(B, H, Hq // H * Tq, -1)
    out = torch.einsum("bhtr,hdr->bhtd", mixed, v_basis.to(qc.dtype)) + v_mean.to(qc.dtype)[None, :, None]
    return out.reshape(B, Hq, Tq, d)


def quantize_tokens(x: Tensor, bits: int, group_size: int, symmetric: bool = False,
                    backend: str | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token groups of x (..., D) -> packed codes (..., D * bits / 8) uint8, fp16 scale and zero (..., D / g).

    Bit for bit the storage's ``quantize`` with per-token groups (see ``reference.quantize_tokens``).
    """
    if resolve(x.device, backend) == "triton":
        from kvcompress.kernels import triton_quantize
        if triton_quantize.supported(x.shape[-1], group_size):
            return triton_quantize.quantize_tokens(x, bits, group_size, symmetric)
    return reference.quantize_tokens(x, bits, group_size, symmetric)
