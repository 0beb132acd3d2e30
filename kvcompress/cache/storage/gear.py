"""``storage=gear``: GEAR (Kang et al., 2024): uniform low-bit codes + a low-rank approximation of the
quantization residual + sparse outliers, per block of ``block_size`` tokens and per KV head.

Per block X (block_size x head_dim) of one head: the ``outlier_fraction`` largest-|x| entries are set aside
exactly (fp16 values + int16 flat indices), the rest is quantized KIVI-style (keys per channel in groups of
``group_size`` tokens, values per token in groups of ``group_size`` channels, fp16 scale and zero), and the
residual R = X - outliers - dequant(codes) is approximated by its best rank-``rank`` factors A B (truncated
SVD; GEAR uses a few power iterations, which approach the same factors), stored in fp16: A (block_size x r)
per token, B (r x head_dim) per block. The most recent ``residual`` tokens and an unfinished block stay fp16
(GEAR's streaming buffer). Every byte is a held tensor: codes, scales, zeros, factors, outlier values/indices.

Eviction: a block's factors span its tokens, so ``keep`` rebuilds the kept tokens and compresses them again
from scratch (a token may be compressed twice); GEAR itself does not evict.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.buffers import gather_tokens
from kvcompress.cache.checks import int_at_least, number_in, one_of
from kvcompress.cache.storage.base import KEY_MODES, PartsStore
from kvcompress.cache.storage.quant.quantizer import QTensor, QuantConfig, dequantize, quantize


class Blocks:
    """A tensor grown along dim 2 by concatenation: compressed data arrives once per block, so a spare
    capacity (``GrowingBuffer``) would only hold unused bytes."""

    def __init__(self) -> None:
        self.data: Tensor | None = None

    def append(self, x: Tensor) -> None:
        self.data = x.contiguous() if self.data is None else torch.cat([self.data, x], 2)

    def view(self) -> Tensor:
        return self.data

    def tensors(self) -> list[Tensor]:
        return [self.data] if self.data is not None else []

    reserved = tensors


class GearPart:
    """One of K or V: compressed blocks, then the fp16 recent tokens ``res``."""

    NAMES = ("codes", "scale", "zero", "a", "b", "out", "idx")

    def __init__(self, cfg: QuantConfig, block: int, residual: int, rank: int, n_out: int):
        self.cfg, self.block, self.residual, self.rank, self.n_out = cfg, block, residual, rank, n_out
        self.buf = {n: Blocks() for n in self.NAMES}
        self.res: Tensor | None = None
        self.n_q = 0

    def split(self, n: int) -> int:
        return max(n - self.residual, 0) // self.block * self.block

    def append(self, x: Tensor) -> None:
        full = x.half() if self.res is None else torch.cat([self.res, x.half()], 2)
        n = self.split(self.n_q + full.shape[2]) - self.n_q
        if n > 0:
            self._compress(full[:, :, :n].float())
        self.res = full[:, :, n:].contiguous()

    def _compress(self, x: Tensor) -> None:
        B, H, T, D = x.shape
        blocks = x.unflatten(2, (T // self.block, self.block))  # (B, H, nb, block, D)
        flat = blocks.flatten(-2)
        idx = flat.abs().topk(self.n_out, dim=-1).indices
        dense = flat.scatter(-1, idx, 0.0).view_as(blocks)
        q = quantize(dense.flatten(2, 3), self.cfg)
        for name, t in (("codes", q.codes), ("scale", q.scale), ("zero", q.zero)):
            self.buf[name].append(t)
        if self.n_out:
            self.buf["out"].append(flat.gather(-1, idx).half())
            self.buf["idx"].append(idx.to(torch.int16))
        if self.rank:
            r = (dense - dequantize(q, self.cfg).view_as(blocks)).flatten(-2).scatter(-1, idx, 0.0).view_as(blocks)
            u, s, vh = torch.linalg.svd(r, full_matrices=False)
            self.buf["a"].append((u[..., : self.rank] * s[..., None, : self.rank]).flatten(2, 3).half())
            self.buf["b"].append(vh[..., : self.rank, :].half())
        self.n_q += T

    def read(self, dtype: torch.dtype) -> Tensor:
        if not self.n_q:
            return self.res.to(dtype)
        b = self.buf
        x = dequantize(QTensor(b["codes"].view(), b["scale"].view(), b["zero"].view()), self.cfg)
        x = x.unflatten(2, (-1, self.block))
        if self.rank:
            x = x + b["a"].view().float().unflatten(2, (-1, self.block)) @ b["b"].view().float()
        if self.n_out:
            x = x.flatten(-2).scatter(-1, b["idx"].view().long(), b["out"].view().float()).view_as(x)
        return torch.cat([x.flatten(2, 3).to(dtype), self.res.to(dtype)], 2)

    def keep(self, idx: Tensor) -> None:
        kept = gather_tokens(self.read(torch.float32), idx)
        self.__init__(self.cfg, self.block, self.residual, self.rank, self.n_out)
        self.append(kept)

    def tensors(self) -> list[Tensor]:
        return [t for b in self.buf.values() for t in b.tensors()] + ([self.res] if self.res is not None else [])

    def reserved(self) -> list[Tensor]:
        return [t for b in self.buf.values() for t in b.reserved()] + ([self.res] if self.res is not None else [])


class GEARStore(PartsStore):
    def __init__(self, bits: int = 2, group_size: int = 32, block_size: int = 64, rank: int = 2,
                 outlier_fraction: float = 0.02, residual: int = 0, keys: str = "post_rope"):
        one_of("storage.bits", bits, (8, 4, 2))
        int_at_least("storage.group_size", group_size, 1)
        int_at_least("storage.block_size", block_size, 1)
        int_at_least("storage.rank", rank, 0)
        number_in("storage.outlier_fraction", outlier_fraction, 0, 1)
        int_at_least("storage.residual", residual, 0)
        if block_size % group_size:
            raise ValueError(f"storage.block_size={block_size} must be a multiple of storage.group_size={group_size} "
                             "(keys are quantized per channel in groups of group_size tokens)")
        self.bits, self.group_size, self.block, self.rank = bits, group_size, block_size, rank
        self.fraction, self.residual = float(outlier_fraction), residual
        super().__init__(one_of("storage.keys", keys, KEY_MODES))

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        D = spec.head_dim
        int_at_least("storage.rank", self.rank, 0, min(self.block, D))
        self.value_group = min(self.group_size, D)
        if D % self.value_group or D % (8 // self.bits):
            raise ValueError(f"storage.group_size={self.group_size} must divide head_dim={D} (values per token)")
        if self.block * D > 2**15 - 1:
            raise ValueError(f"storage.block_size={self.block} x head_dim={D} must be < 32768 (int16 outlier indices)")
        self.n_out = min(self.block * D, round(self.fraction * self.block * D))

    def clear_payload(self) -> None:
        self.dtype = None
        if not hasattr(self, "n_out"):  # before check(spec): no dimensions yet
            self.k = self.v = None
            return
        part = lambda g, axis: GearPart(QuantConfig(self.bits, g, axis), self.block, self.residual, self.rank,
                                        self.n_out)
        self.k, self.v = part(self.group_size, "channel"), part(self.value_group, "token")

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.dtype = k.dtype
        self.k.append(k)
        self.v.append(v)

    def report(self) -> dict[str, float | str]:
        return {"gear_outliers_per_block": float(getattr(self, "n_out", 0))}
