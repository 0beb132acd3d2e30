"""``storage=pq``: product quantization of keys and values (Jégou et al., 2011; the vector-quantized KV caches of
CommVQ and PQCache): each head vector is cut into sub-vectors of ``key_sub`` / ``value_sub`` channels, and each
sub-vector is stored as the 8-bit index of its nearest of 256 centroids. The codebooks (per layer, KV head,
sub-space and side; fp16) are learned by k-means on the calibration text and count as calibration bytes. Bits per
entry: 8 / sub (2: 4 bits, 4: 2 bits, 8: 1 bit); no per-token scale.

``keys=pre_rope`` (default): codebooks of pre-RoPE keys (a key's RoPE-rotated form depends on its position, which
spreads the codebook over rotations; the store rotates what it reads, so it decodes eagerly). ``keys=post_rope``
learns codebooks of keys rotated at the calibration positions (needs the calibration's rotary) and has a
captured form. k-means: ``iters`` Lloyd iterations from 256 distinct samples (seeded), empty clusters keep their
centroid. Calibrations are saved like KVQuant's (``calibration_file``, else under ``paths.calibration``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.checks import int_at_least
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.frontier.formats import on_device, saved_fit

CENTROIDS = 256


def kmeans(x: Tensor, iters: int, gen: torch.Generator) -> Tensor:
    """Batched Lloyd k-means: x (S, N, d) fp32 -> centroids (S, 256, d)."""
    S, N, d = x.shape
    pick = torch.randperm(N, generator=gen)[:CENTROIDS]
    if N < CENTROIDS:
        pick = pick.repeat(CENTROIDS // N + 1)[:CENTROIDS]
    c = x[:, pick].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(-1)  # (S, N)
        num = torch.zeros_like(c).scatter_add_(1, a[..., None].expand(-1, -1, d), x)
        den = torch.zeros(S, CENTROIDS, 1).scatter_add_(1, a[..., None], torch.ones(S, N, 1))
        c = torch.where(den > 0, num / den.clamp_min(1), c)
    return c


class PQStore(CodecStore):
    def __init__(self, key_sub: int = 2, value_sub: int = 4, iters: int = 20, seed: int = 0,
                 keys: str = "pre_rope", calibration_file: str | None = None):
        self.sub = {"k": int_at_least("storage.key_sub", key_sub, 1),
                    "v": int_at_least("storage.value_sub", value_sub, 1)}
        self.iters, self.seed = int_at_least("storage.iters", iters, 1), int_at_least("storage.seed", seed, 0)
        self.calibration_file = calibration_file
        self.books: list[dict[str, Tensor]] | None = None  # per layer {"k": (H, M, 256, sub) fp16, "v": ...}
        self.stats: dict[str, float | str] = {}
        super().__init__(keys)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        for name, setting in (("k", "storage.key_sub"), ("v", "storage.value_sub")):
            if spec.head_dim % self.sub[name]:
                raise ValueError(f"{setting}={self.sub[name]} must divide head_dim={spec.head_dim}")

    def settings(self) -> dict:
        return {"key_sub": self.sub["k"], "value_sub": self.sub["v"], "iters": self.iters, "seed": self.seed,
                "keys": self.keys}

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        gen = torch.Generator().manual_seed(self.seed)  # one stream over the layers, in order
        self.books, self.stats = saved_fit(self, ctx, "pq", "PQ codebooks", "books",
                                           lambda k, v: self._fit_layer(k, v, gen))

    def _fit_layer(self, k: Tensor, v: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
        layer = {}
        for name, x in (("k", k), ("v", v)):
            H = x.shape[1]
            sub = x[0].float().unflatten(-1, (-1, self.sub[name])).transpose(1, 2)  # (H, M, N, sub)
            c = kmeans(sub.flatten(0, 1), self.iters, gen)
            layer[name] = c.unflatten(0, (H, -1)).half()  # (H, M, 256, sub)
        return layer

    def _book(self, name: str, like: Tensor) -> Tensor:
        if self.books is None:
            raise ValueError("storage=pq has no codebooks: it must be calibrated (kvc calibrates every run)")
        return on_device(self.books[self.layer], name, like)

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        parts = {}
        for name, x in (("k", k), ("v", v)):
            book = self._book(name, x).float()  # (H, M, 256, s)
            g = x.float().unflatten(-1, (-1, self.sub[name]))  # (B, H, T, M, s)
            # nearest centroid: argmin ||c||^2 - 2 x.c (||x||^2 is the same for every centroid)
            score = book.square().sum(-1)[None, :, None] - 2 * torch.einsum("bhtms,hmcs->bhtmc", g, book)
            parts[name] = score.argmin(-1).to(torch.uint8)
        return parts

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        out = []
        for name in ("k", "v"):
            codes = parts[name].long()  # (B, H, T, M)
            book = self._book(name, codes)
            H, M = book.shape[:2]
            h = torch.arange(H, device=codes.device)[None, :, None, None]
            m = torch.arange(M, device=codes.device)[None, None, None, :]
            out.append(book[h, m, codes].flatten(-2).to(dtype))
        return out[0], out[1]

    def calibration_tensors(self) -> list[Tensor]:
        return [t for layer in self.books or [] for t in layer.values()]

    def report(self) -> dict[str, float | str]:
        return dict(self.stats)
