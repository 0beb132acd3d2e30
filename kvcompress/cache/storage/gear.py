"""``storage=gear``: GEAR (Kang et al., 2024): uniform low-bit codes + a low-rank approximation of the
quantization residual + sparse outliers, per block of ``block_size`` tokens and per KV head.

Per block X (block_size x head_dim) of one head: the ``outlier_fraction`` largest-|x| entries are set aside
exactly (fp16 values + int16 flat indices), the rest is quantized KIVI-style (keys per channel in groups of
``group_size`` tokens, values per token in groups of ``group_size`` channels, fp16 scale and zero), and the
residual R = X - outliers - dequant(codes) is approximated by its best rank-``rank`` factors A B (truncated
SVD; GEAR uses a few power iterations, which approach the same factors), stored in fp16: A (block_size x r)
per token, B (r x head_dim) per block. The most recent ``residual`` tokens and an unfinished block stay fp16
(GEAR's streaming buffer). Every byte is a held tensor: codes, scales, zeros, factors, outlier values/indices.

Each of K and V is a ``GearSide`` codec behind the residual stage (``storage.residual``: eager, and captured for
``rank`` 0 only: ``CAPTURE_REFUSAL``). Eviction (GEAR itself does not evict): a kept block that is exactly an old
block keeps its parts; any other block is compressed again from the held (decoded) values.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.checks import int_at_least, number_in, one_of
from kvcompress.cache.storage.base import KEY_MODES
from kvcompress.cache.storage.quant.quantizer import QTensor, QuantConfig, dequantize, quantize
from kvcompress.cache.storage.residual import GroupCodec, ResidualStore

CAPTURE_REFUSAL = ("storage=gear with storage.rank > 0 has no captured form: coding a block takes a truncated SVD "
                   "(torch.linalg.svd), which synchronises a CUDA device with the host, so a step that may flush a "
                   "block cannot be recorded as a CUDA graph; it decodes eagerly (storage.rank=0 has a captured form)")


class GearSide(GroupCodec):
    """One of K or V in blocks of ``block`` tokens: codes, scale, zero; ``a`` (per token) and ``b`` (per block) the
    rank-r factors; ``out`` / ``idx`` (per block) the outliers."""

    def __init__(self, cfg: QuantConfig, block: int, rank: int, n_out: int):
        self.cfg, self.gran, self.rank, self.n_out = cfg, block, rank, n_out

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        blocks = x.float().unflatten(2, (-1, self.gran))  # (B, H, nb, block, D)
        flat = blocks.flatten(-2)
        idx = flat.abs().topk(self.n_out, dim=-1).indices
        dense = flat.scatter(-1, idx, 0.0).view_as(blocks)
        q = quantize(dense.flatten(2, 3), self.cfg)
        parts = {"codes": q.codes, "scale": q.scale, "zero": q.zero}
        if self.n_out:
            parts |= {"out": flat.gather(-1, idx).half(), "idx": idx.to(torch.int16)}
        if self.rank:
            r = (dense - dequantize(q, self.cfg).view_as(blocks)).flatten(-2).scatter(-1, idx, 0.0).view_as(blocks)
            u, s, vh = torch.linalg.svd(r, full_matrices=False)
            parts |= {"a": (u[..., : self.rank] * s[..., None, : self.rank]).flatten(2, 3).half(),
                      "b": vh[..., : self.rank, :].half()}
        return parts

    def decode(self, parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        x = dequantize(QTensor(parts["codes"], parts["scale"], parts["zero"]), self.cfg).unflatten(2, (-1, self.gran))
        if self.rank:
            x = x + parts["a"].float().unflatten(2, (-1, self.gran)) @ parts["b"].float()
        if self.n_out:
            x = x.flatten(-2).scatter(-1, parts["idx"].long(), parts["out"].float()).view_as(x)
        return x.flatten(2, 3).to(dtype)


class GEARStore(ResidualStore):
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

    def side_codecs(self) -> tuple[GearSide, GearSide] | None:
        if not hasattr(self, "n_out"):  # before check(spec): no dimensions yet
            return None
        side = lambda g, axis: GearSide(QuantConfig(self.bits, g, axis), self.block, self.rank, self.n_out)
        return side(self.group_size, "channel"), side(self.value_group, "token")

    def static_form(self, capacity: int):
        """The residual stage's fixed slots for ``rank`` 0; None with a rank (``CAPTURE_REFUSAL`` says why)."""
        return None if self.rank else super().static_form(capacity)

    def report(self) -> dict[str, float | str]:
        return {"gear_outliers_per_block": float(getattr(self, "n_out", 0))} | (
            {"gear_captured_form": CAPTURE_REFUSAL} if self.rank else {})
