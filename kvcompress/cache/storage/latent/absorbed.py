"""Projections of one latent and attention computed in the latent space (MLA-style absorption).

Shapes: latents c (B, G, T, r) with G = 1 (heads joined) or Hkv (per head); a projection maps
c to n = (Hkv / G) * d dims per group. GQA queries (B, Hq, Tq, D) are viewed as
(B, Hkv, groups * Tq, D) so every KV head's latents are used once, never repeated per query head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompress.cache.base import visibility_mask
from kvcompress.cache.storage.latent.calibrate import from_groups, to_groups


@dataclass
class Projection:
    """x ~ mean + c @ basis^T, c = (x - mean) @ basis; basis (G, n, r) orthonormal columns, mean (G, n)."""

    basis: Tensor
    mean: Tensor
    heads: int

    @property
    def rank(self) -> int:
        return self.basis.shape[-1]

    def to(self, device: torch.device, dtype: torch.dtype) -> Projection:
        return Projection(self.basis.to(device, dtype).contiguous(), self.mean.to(device, dtype), self.heads)

    def down(self, x: Tensor) -> Tensor:
        """(B, G, T, n) -> latents (B, G, T, r)."""
        return (x - self.mean[:, None]) @ self.basis

    def head_basis(self) -> Tensor:
        """(Hkv, d, r): the rows of the basis that produce each KV head's dims."""
        G, n, r = self.basis.shape
        return self.basis.reshape(self.heads, n * G // self.heads, r)

    def head_mean(self) -> Tensor:
        return self.mean.reshape(self.heads, -1)

    def encode_heads(self, x: Tensor) -> Tensor:
        return self.down(to_groups(x, self.basis.shape[0]))

    def decode_heads(self, c: Tensor) -> Tensor:
        """latents (B, G, T, r) -> (B, Hkv, T, d)."""
        return from_groups(c @ self.basis.transpose(-1, -2) + self.mean[:, None], self.heads)


def gqa_view(q: Tensor, heads: int) -> Tensor:
    """(B, Hq, Tq, X) -> (B, Hkv, groups * Tq, X)."""
    B, Hq, Tq, X = q.shape
    return q.reshape(B, heads, Hq // heads * Tq, X)


def latent_attention(q: Tensor, q_pos: Tensor, k_pos: Tensor, value: Tensor, v_proj: Projection,
                     key_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over ``key_scores`` (B, Hkv, groups*Tq, T), weights applied to the value latents first, then
    one up-projection per head: out = (P @ c_v) @ U_v^T + mean_v (rows of P sum to 1). Returns the output
    (B, Hq, Tq, D) and the weights P (B, Hq, Tq, T)."""
    B, Hq, Tq, D = q.shape
    H = v_proj.heads
    scores = key_scores.view(B, H, Hq // H, Tq, -1) * D**-0.5
    mask = visibility_mask(q_pos, k_pos)  # (B, 1, Tq, T)
    p = scores.masked_fill(~mask[:, :, None], float("-inf")).float().softmax(-1).to(q.dtype)
    mixed = shared_matmul(p.view(B, H, Hq // H * Tq, -1), value)  # (B, Hkv, g*Tq, r)
    out = torch.einsum("bhtr,hdr->bhtd", mixed, v_proj.head_basis()) + v_proj.head_mean()[None, :, None]
    return out.reshape(B, Hq, Tq, -1), p.view(B, Hq, Tq, -1)


def absorbed_key_scores(qc: Tensor, key: Tensor, k_proj: Projection) -> Tensor:
    """q . (mean + c U^T) over keys = (q U) . c + const; the constant q . mean cancels in softmax.

    qc (B, Hq, Tq, d) are the query dims matching the compressed (unrotated) key dims."""
    q = gqa_view(qc, k_proj.heads)
    qa = torch.einsum("bhtd,hdr->bhtr", q, k_proj.head_basis())  # U_k folded into the query
    return shared_matmul(qa, key.transpose(-1, -2))


def shared_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a (B, Hkv, M, K) @ b (B, G, K, N) with G = 1 or Hkv; one latent shared by all heads is used in one
    matmul over all heads' rows instead of being broadcast (copied) per head."""
    if b.shape[1] == 1 and a.shape[1] > 1:
        B, H, M, _ = a.shape
        return (a.reshape(B, 1, H * M, -1) @ b).view(B, H, M, -1)
    return a @ b
