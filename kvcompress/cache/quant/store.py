"""``QuantizedStore``: group-wise int8 / int4 / int2 K and V with fp16 scales, packed codes and an
optional full-precision residual window. Registered as storages ``quant``, ``int8``, ``int4``, ``int2``.

Any cache built on ``LayeredCache`` can use it (``storage="int4"``): eviction through ``keep``
(whole rows or per head), sharing by pointing several layers at one store.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.quant.part import RESIDUAL_DTYPES, QuantPart
from kvcompress.cache.quant.quantizer import QuantConfig
from kvcompress.cache.store import GrowingBuffer, TokenStore, append_positions, gather_tokens, register_storage


@register_storage("quant")
class QuantizedStore(TokenStore):
    """K and V quantized separately (own axis and group size), positions as int32.

    ``group_size`` counts channels for per-token groups and tokens for per-channel groups;
    ``key_group_size`` / ``value_group_size`` override it for one side. ``residual`` recent
    tokens stay in ``residual_dtype`` ("model" keeps the model's dtype). ``dequant_cache`` keeps a
    dequantized copy that grows with each append, so ``read`` never dequantizes the whole history
    (faster decode; its bytes are reported and cancel the memory saving, see ``QuantPart``).
    """

    def __init__(self, bits: int = 4, group_size: int = 64, key_axis: str = "token", value_axis: str = "token",
                 symmetric: bool = False, residual: int = 0, residual_dtype: str = "float16",
                 key_group_size: int | None = None, value_group_size: int | None = None,
                 dequant_cache: bool = False):
        if not isinstance(residual, int) or residual < 0:
            raise ValueError(f"residual must be an integer >= 0, got {residual!r}")
        if residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual_dtype must be one of {list(RESIDUAL_DTYPES)}, got {residual_dtype!r}")
        self.params = dict(bits=bits, group_size=group_size, key_axis=key_axis, value_axis=value_axis,
                           symmetric=symmetric, residual=residual, residual_dtype=residual_dtype,
                           key_group_size=key_group_size, value_group_size=value_group_size,
                           dequant_cache=dequant_cache)
        self.key_cfg = QuantConfig(bits, key_group_size or group_size, key_axis, symmetric)
        self.value_cfg = QuantConfig(bits, value_group_size or group_size, value_axis, symmetric)
        self.k = QuantPart(self.key_cfg, residual, residual_dtype, bool(dequant_cache))
        self.v = QuantPart(self.value_cfg, residual, residual_dtype, bool(dequant_cache))
        self.pos = GrowingBuffer()
        self.dtype: torch.dtype | None = None

    def check(self, spec: ModelSpec) -> None:
        self.key_cfg.check_head_dim(spec.head_dim, "key group_size")
        self.value_cfg.check_head_dim(spec.head_dim, "value group_size")

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.dtype = k.dtype
        self.k.append(k)
        self.v.append(v)
        append_positions(self.pos, pos)

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.k.read(self.dtype), self.v.read(self.dtype), self.positions()

    def positions(self) -> Tensor:
        p = self.pos.view()
        return p[:, 0] if p.shape[1] == 1 else p

    def keep(self, idx: Tensor) -> None:
        if self.k.res is None:
            return
        B, H = self.k.res.shape[:2]
        full = idx[:, None].expand(B, H, idx.shape[-1]) if idx.dim() == 2 else idx
        self.k.keep(full)
        self.v.keep(full)
        self.pos.replace(gather_tokens(self.pos.view(), idx))

    def tensors(self) -> list[Tensor]:
        pos = [self.pos.view()] if self.pos.data is not None else []
        return pos + self.k.tensors() + self.v.tensors()

    def reserved_tensors(self) -> list[Tensor]:
        pos = [self.pos.data] if self.pos.data is not None else []
        return pos + self.k.reserved_tensors() + self.v.reserved_tensors()

    @property
    def length(self) -> int:
        return self.k.length

    def full_precision_positions(self) -> tuple[Tensor, Tensor]:
        """Positions of the tokens whose K (and V) are held in full precision, (B, r) or (B, H, r)."""
        p = self.positions()
        return p[..., self.k.n_q :], p[..., self.v.n_q :]


@register_storage("int8")
class Int8Store(QuantizedStore):
    """``int8``: a QuantizedStore with bits=8."""

    def __init__(self, bits: int = 8, **params):
        super().__init__(bits=bits, **params)


@register_storage("int4")
class Int4Store(QuantizedStore):
    """``int4``: a QuantizedStore with bits=4 (two codes per byte)."""

    def __init__(self, bits: int = 4, **params):
        super().__init__(bits=bits, **params)


@register_storage("int2")
class Int2Store(QuantizedStore):
    """``int2``: a QuantizedStore with bits=2 (four codes per byte)."""

    def __init__(self, bits: int = 2, **params):
        super().__init__(bits=bits, **params)
