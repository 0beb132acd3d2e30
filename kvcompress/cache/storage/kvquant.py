"""``storage=kvquant``: KVQuant (Hooper et al., 2024): keys per channel before RoPE, values per token,
non-uniform per-layer codebooks (nuq) from sensitivity-weighted k-means on calibration data, and
dense-and-sparse outliers kept exactly.

Keys: each channel is normalised by a calibrated range (the ``outlier_fraction/2`` and ``1 - outlier_fraction/2``
quantiles of that channel on the calibration text: KVQuant's offline per-channel scaling), values by their own
token's range (online, fp16 scale and zero per token and head). The normalised value in [-1, 1] is stored as
the index of the nearest of ``2**bits`` levels of the layer's codebook. Per token and head the
``round(outlier_fraction * head_dim)`` entries farthest out (normalised) are kept exactly as a sparse part:
``outlier_dtype`` values and uint8 channel indices (their bytes count). A fixed count per vector (KVQuant
thresholds by a calibrated percentile, so its count varies) keeps every tensor per token, so eviction gathers
tokens exactly. 3-bit codes are packed 8 codes into 3 bytes. Every part is per token: a per-token codec
(``storage.codec``, calibrated per layer), held in the generic buffers.

Sensitivity weighting: KVQuant weighs k-means by Fisher information (squared gradients); a storage has no
gradients, so ``sensitivity: query`` weighs a key entry by the calibrated mean square of the query channels
that multiply it (the expected squared attention-score error per unit error; pre-RoPE channels c and
c + head_dim/2 share a rotation, so their query moments are averaged) times its channel scale squared, and a
value entry by its token scale squared; ``none``: plain k-means. Not implemented: the attention-sink token
kept in fp16, and the per-vector dynamic outlier threshold.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from kvcompress.cache import artifacts
from kvcompress.cache.base import ModelSpec
from kvcompress.cache.checks import DTYPES, dtype_of, number_in, one_of
from kvcompress.cache.storage.base import KEY_MODES
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.queries import channel_moments
from kvcompress.kernels.reference import pack, unpack

SENSITIVITY = ("query", "none")
KMEANS_SAMPLES, KMEANS_ITERS = 1 << 20, 30


def regroup_bits(x: Tensor, width: int, out_width: int) -> Tensor:
    """uint8 items of ``width`` bits (..., N) -> items of ``out_width`` bits, via 24-bit words, low bits first."""
    shifts = lambda step: torch.arange(0, 24, step, device=x.device, dtype=torch.int32)
    word = (x.unflatten(-1, (-1, 24 // width)).to(torch.int32) << shifts(width)).sum(-1, dtype=torch.int32)
    return ((word[..., None] >> shifts(out_width)) & ((1 << out_width) - 1)).to(torch.uint8).flatten(-2)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (..., D) -> bytes: 2 and 4 bits by ``kernels.reference.pack``; 3 bits as 8 codes in 3 bytes."""
    return regroup_bits(codes, 3, 8) if bits == 3 else pack(codes, bits)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    return regroup_bits(packed, 8, 3) if bits == 3 else unpack(packed, bits)


def kmeans_1d(x: Tensor, w: Tensor, levels: int, iters: int = KMEANS_ITERS) -> Tensor:
    """Weighted 1-D k-means of x in [-1, 1]: ``levels`` sorted centroids (float32), from uniform levels."""
    x, w = x.double(), w.double()
    c = torch.linspace(-1, 1, levels, dtype=torch.float64)
    for _ in range(iters):
        a = torch.bucketize(x, (c[1:] + c[:-1]) / 2)
        num = torch.zeros(levels, dtype=torch.float64).index_add_(0, a, w * x)
        den = torch.zeros(levels, dtype=torch.float64).index_add_(0, a, w)
        c = torch.where(den > 0, num / den.clamp_min(1e-300), c).sort().values
    return c.float()


class KVQuantStore(CodecStore):
    def __init__(self, bits: int = 4, outlier_fraction: float = 0.01, outlier_dtype: str = "float16",
                 sensitivity: str = "query", keys: str = "pre_rope", calibration_file: str | None = None):
        one_of("storage.bits", bits, (4, 3, 2))
        number_in("storage.outlier_fraction", outlier_fraction, 0, 1)
        one_of("storage.outlier_dtype", outlier_dtype, DTYPES)
        one_of("storage.sensitivity", sensitivity, SENSITIVITY)
        self.bits, self.fraction, self.outlier_dtype = bits, float(outlier_fraction), outlier_dtype
        self.sensitivity, self.calibration_file = sensitivity, calibration_file
        self.layers: list[dict[str, Tensor]] | None = None
        self.stats: dict[str, float | str] = {}
        super().__init__(one_of("storage.keys", keys, KEY_MODES))

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if spec.head_dim % 8 or spec.head_dim > 256:
            raise ValueError(f"storage=kvquant packs codes in bytes (3 bits: 8 per 3 bytes) and indexes channels "
                             f"in uint8: head_dim must be a multiple of 8 in [8, 256], got {spec.head_dim}")
        self.k_out = max(1, round(self.fraction * spec.head_dim)) if self.fraction > 0 else 0

    # -- calibration --------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"bits": self.bits, "outlier_fraction": self.fraction, "sensitivity": self.sensitivity,
                "keys": self.keys, "iters": KMEANS_ITERS}

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:10]
        path = Path(self.calibration_file or Path(ctx.cache_dir) / f"kvquant-{ctx.key}-{digest}.pt").expanduser()
        meta = {"ctx_key": ctx.key, **self.settings()}

        def same_meta(blob: dict) -> bool:
            if blob.get("meta") != meta:
                raise ValueError(f"KVQuant calibration file {path} was made for {blob.get('meta')}, not {meta}; "
                                 "delete it or set storage.calibration_file to another path")
            return True

        blob, reused = artifacts.cached(path, lambda: {"meta": meta, "layers": self._fit(ctx)},
                                        "KVQuant calibration file", same_meta)
        self.layers, self.stats = blob["layers"], {"calibration_reused": float(reused), "calibration_file": str(path)}
        self._device = None

    def _fit(self, ctx) -> list[dict[str, Tensor]]:
        H, D = self.spec.num_kv_heads, self.spec.head_dim
        q2 = None
        if self.sensitivity == "query":
            q2 = channel_moments(ctx, self.spec)["q"].unflatten(1, (H, -1)).sum(2)  # (L, Hkv, D)
            if self.keys == "pre_rope":  # a pre-RoPE channel's error is rotated into its pair's channel too
                q2 = (q2 + q2.roll(D // 2, -1)) / 2
        g, out = torch.Generator().manual_seed(0), []
        for layer, (k, v, pos) in enumerate(ctx.kv_samples()):
            k, v = k.float(), v.float()  # (1, Hkv, N, D)
            if self.keys == "post_rope":
                k = ctx.rope.rotate(k, pos)
            q = torch.tensor([self.fraction / 2, 1 - self.fraction / 2])
            lo, hi = k[0].quantile(q, dim=1)  # per KV head and channel, (Hkv, D) each
            mid, half = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(1e-6)
            kn, kidx = self._normalise(k, mid[None, :, None], half[None, :, None])
            vmid, vhalf, vidx = self._value_scale(v)
            vn, vidx = self._normalise(v, vmid, vhalf, vidx)
            kw = (q2[layer][None, :, None] if q2 is not None else 1) * half[None, :, None].square()
            vw = vhalf.square() if q2 is not None else torch.ones(())
            books = {}
            for side, xn, idx, w in (("key", kn, kidx, kw.expand_as(kn)), ("value", vn, vidx, vw.expand_as(vn))):
                dense = torch.ones_like(xn, dtype=torch.bool).scatter(-1, idx, False)
                x, w = xn[dense], w[dense]
                pick = torch.randperm(x.numel(), generator=g)[:KMEANS_SAMPLES]
                books[side] = kmeans_1d(x[pick], w[pick], 2**self.bits)
            out.append({"key_mid": mid, "key_half": half, "key_book": books["key"], "value_book": books["value"]})
        return out

    def _normalise(self, x: Tensor, mid: Tensor, half: Tensor, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(x - mid) / half clamped to [-1, 1], and each vector's outliers (given, or the largest |x - mid| / half)."""
        xn = (x - mid) / half
        idx = xn.abs().topk(self.k_out, dim=-1).indices if idx is None else idx
        return xn.clamp(-1, 1), idx

    def _value_scale(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token zero (mid) and scale (half range), fp16-representable, of v (..., D) without its k_out
        largest-|v| entries (those are kept exactly)."""
        idx = v.abs().topk(self.k_out, dim=-1).indices
        lo = v.scatter(-1, idx, float("inf")).amin(-1, keepdim=True)
        hi = v.scatter(-1, idx, float("-inf")).amax(-1, keepdim=True)
        if self.k_out >= v.shape[-1]:  # every entry exact: no dense range
            lo = hi = torch.zeros_like(lo)
        mid, half = ((hi + lo) / 2).half(), ((hi - lo) / 2).half().clamp_min(2.0**-14)
        return mid.float(), half.float(), idx

    # -- tokens: a per-token codec (calibrated per layer) ---------------------------------------
    def _cal(self, device: torch.device) -> dict[str, Tensor]:
        """This layer's calibration on ``device`` (moved once per store)."""
        if self.layers is None:
            raise RuntimeError("storage=kvquant needs calibrate(ctx) before use")
        if self._device != device:
            self.cal, self._device = {n: t.to(device) for n, t in self.layers[self.layer].items()}, device
        return self.cal

    def clear_payload(self) -> None:
        super().clear_payload()
        self._device = None

    def _encode(self, x: Tensor, mid: Tensor, half: Tensor, book: Tensor, side: str, idx: Tensor | None = None
                ) -> dict[str, Tensor]:
        xn, idx = self._normalise(x.float(), mid, half, idx)
        codes = torch.bucketize(xn.contiguous(), (book[1:] + book[:-1]) / 2).to(torch.uint8)
        parts = {f"{side}_codes": pack_codes(codes, self.bits)}
        if self.k_out:  # the sparse outliers: values and uint8 channel indices
            out_dtype = dtype_of("storage.outlier_dtype", self.outlier_dtype) or x.dtype
            parts |= {f"{side}_out": x.gather(-1, idx).to(out_dtype), f"{side}_idx": idx.to(torch.uint8)}
        return parts

    def _decode(self, parts: dict[str, Tensor], side: str, mid: Tensor, half: Tensor, book: Tensor, dtype
                ) -> Tensor:
        x = (mid + half * book[unpack_codes(parts[f"{side}_codes"], self.bits).long()]).to(dtype)
        if not self.k_out:
            return x
        return x.scatter_(-1, parts[f"{side}_idx"].long(), parts[f"{side}_out"].to(dtype))

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        c = self._cal(k.device)
        parts = self._encode(k, c["key_mid"][None, :, None], c["key_half"][None, :, None], c["key_book"], "k")
        mid, half, idx = self._value_scale(v.float())
        parts["v_scale"] = torch.cat([mid, half], -1).half()
        return parts | self._encode(v, mid, half, c["value_book"], "v", idx)

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        c, s = self._cal(parts["k_codes"].device), parts["v_scale"].float()
        k = self._decode(parts, "k", c["key_mid"][None, :, None], c["key_half"][None, :, None], c["key_book"], dtype)
        return k, self._decode(parts, "v", s[..., :1], s[..., 1:], c["value_book"], dtype)

    def calibration_tensors(self) -> list[Tensor]:
        return [t for layer in self.layers or [] for t in layer.values()]

    def report(self) -> dict[str, float | str]:
        return {"kvquant_outliers_per_vector": float(getattr(self, "k_out", 0)), **self.stats}
