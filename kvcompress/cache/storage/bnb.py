"""bitsandbytes blockwise K/V storage: 8-bit dynamic (``bnb_int8``), NF4 (``bnb_nf4``), FP4 (``bnb_fp4``): one
class, ``kind`` picks the codec.

Every call goes through ``bitsandbytes.functional``. Blocks lie inside one token of one head
(``blocksize`` divides head_dim), so tokens are independent: appending quantizes only the new
tokens and ``keep`` gathers bytes exactly. Per block one absmax is kept, stored as fp16
(bitsandbytes returns fp32; it is cast back at dequantization). The 256-entry (int8) or 16-entry
(4-bit) code books are bitsandbytes constants shared by every cache, not per-batch state.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.storage.codec import CodecStore

KINDS = {"int8": 8, "nf4": 4, "fp4": 4}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


class BnbUnsupported(RuntimeError):
    """bitsandbytes has no kernel for this op on this device / dtype."""


def _functional():
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("bnb_* storages need bitsandbytes: pip install bitsandbytes") from e
    return bnbf


def _call(op: str, x: Tensor, fn):
    try:
        return fn()
    except (NotImplementedError, RuntimeError, AssertionError, ValueError) as e:
        import bitsandbytes

        raise BnbUnsupported(
            f"bitsandbytes {bitsandbytes.__version__} cannot run {op} on device {x.device.type} "
            f"with dtype {x.dtype}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Use device=cpu or cuda, or the int8/int4 storages."
        ) from e


@dataclass
class BnbCodec:
    kind: str = "nf4"
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")

    @property
    def bits(self) -> int:
        return KINDS[self.kind]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, H, T, D) -> bytes (B, H, T, D * bits / 8) uint8 and absmax (B, H, T, D / blocksize) fp16."""
        F, flat = _functional(), x.contiguous()
        if self.kind == "int8":
            q, state = _call("quantize_blockwise", x, lambda: F.quantize_blockwise(flat, blocksize=self.blocksize))
        else:
            q, state = _call(f"quantize_4bit({self.kind})", x, lambda: F.quantize_4bit(
                flat, blocksize=self.blocksize, quant_type=self.kind))
        *lead, D = x.shape
        return q.reshape(*lead, D * self.bits // 8), state.absmax.reshape(*lead, D // self.blocksize).half()

    def decode(self, q: Tensor, absmax: Tensor, dtype: torch.dtype) -> Tensor:
        """Bytes and absmax from ``encode`` -> (B, H, T, D) in ``dtype``."""
        F = _functional()
        *lead, n = q.shape
        shape = torch.Size((*lead, n * 8 // self.bits))
        state = F.QuantState(absmax=absmax.float().reshape(-1), shape=shape, blocksize=self.blocksize, dtype=dtype,
                             code=_code(q.device) if self.kind == "int8" else None,
                             quant_type=None if self.kind == "int8" else self.kind)
        if self.kind == "int8":
            return _call("dequantize_blockwise", q, lambda: F.dequantize_blockwise(q.contiguous(), state))
        flat = q.contiguous().reshape(-1, 1)
        return _call(f"dequantize_4bit({self.kind})", q, lambda: F.dequantize_4bit(flat, state)).reshape(shape)


@functools.cache
def _code(device: torch.device) -> Tensor:
    """bitsandbytes' dynamic 8-bit code book (the default of quantize_blockwise), one per device."""
    return _functional().create_dynamic_map().to(device)


class BnbStore(CodecStore):
    """``storage=bnb_int8|bnb_nf4|bnb_fp4``: K and V through one bitsandbytes codec (``kind``)."""

    def __init__(self, kind: str = "nf4", blocksize: int = 64, keys: str = "post_rope"):
        self.codec = BnbCodec(kind, blocksize)
        super().__init__(keys)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if spec.head_dim % self.codec.blocksize:
            valid = [b for b in BLOCKSIZES if spec.head_dim % b == 0]
            hint = (f"valid for head_dim={spec.head_dim}: {valid}" if valid else
                    f"bitsandbytes blocks are at least {BLOCKSIZES[0]} values, more than head_dim={spec.head_dim}: "
                    "use storage=int8 or int4 on this model")
            raise ValueError(f"storage.blocksize={self.codec.blocksize} must divide head_dim={spec.head_dim}; {hint}")

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        parts = {}
        for name, x in (("k", k), ("v", v)):
            parts[name], parts[name + "_absmax"] = self.codec.encode(x)
        return parts

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        return tuple(self.codec.decode(parts[n], parts[n + "_absmax"], dtype) for n in ("k", "v"))

    def static_form(self, capacity: int):
        """None: bitsandbytes' kernels are not checked under CUDA-graph capture (eager decode)."""
        return None
