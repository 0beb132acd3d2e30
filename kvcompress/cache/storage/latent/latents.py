"""Per-token latent storage for the low-rank cache: dense (a dtype) or quantized (the quant family's parts)."""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.buffers import GrowingBuffer, gather_tokens
from kvcompress.cache.checks import DTYPES
from kvcompress.cache.storage.quant.part import QuantPart
from kvcompress.cache.storage.quant.quantizer import QuantConfig


class Latents:
    """Latents (B, G, T, r) of one layer. ``bits`` quantizes them per token with the quantization family's
    ``QuantPart`` (group-wise codes + fp16 scale/zero; groups of ``group_size`` latent dims, default all r)."""

    def __init__(self, rank: int, dtype: str = "float16", bits: int | None = None, group_size: int | None = None):
        self.dtype = DTYPES[dtype]
        self.quant: QuantPart | None = None
        self.dense = GrowingBuffer()
        if bits is not None:
            self.quant = QuantPart(QuantConfig(bits, group_size or rank, "token", False), 0, dtype)

    def append(self, x: Tensor) -> None:
        if self.quant is not None:
            self.quant.append(x)
        else:
            self.dense.append(x.to(self.dtype or x.dtype))

    def read(self, dtype: torch.dtype) -> Tensor:
        if self.quant is not None:
            return self.quant.read(dtype)
        return self.dense.view().to(dtype)

    def keep(self, idx: Tensor) -> None:
        """Keep tokens ``idx`` (B, T') or (B, G, T') (G = heads of a per-head latent)."""
        if self.quant is not None:
            if self.quant.res is not None:
                B, G = self.quant.res.shape[:2]
                self.quant.keep(idx[:, None].expand(B, G, idx.shape[-1]) if idx.dim() == 2 else idx)
        elif self.dense.data is not None:
            self.dense.replace(gather_tokens(self.dense.view(), idx))

    def tensors(self) -> list[Tensor]:
        if self.quant is not None:
            return self.quant.tensors()
        return [self.dense.view()] if self.dense.data is not None else []

    def reserved_tensors(self) -> list[Tensor]:
        if self.quant is not None:
            return self.quant.reserved()
        return [self.dense.data] if self.dense.data is not None else []
