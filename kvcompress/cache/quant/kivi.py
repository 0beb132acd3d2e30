"""KIVI (Liu et al., 2024): keys quantized per channel, values per token, recent tokens in full precision.

Semantics kept exactly at prefill, decode and any chunking (see ``part.QuantPart.split``): after
``n`` tokens, values hold the last ``min(n, residual)`` tokens in full precision; keys hold the
last ``residual`` tokens plus the unfinished group, i.e. the prefix of keys is the largest multiple
of ``group_size`` not above ``n - residual``. The original implementation flushes keys in blocks
of ``residual`` (0..residual-1 full-precision keys); here at least ``residual`` recent keys are
always exact, at the cost of up to ``group_size - 1`` more full-precision keys.
"""
from __future__ import annotations

from kvcompress.cache.layered import KeyMode
from kvcompress.cache.quant.store import QuantizedStore
from kvcompress.cache.quant_cache import QuantCache
from kvcompress.cache.store import register_storage


@register_storage("kivi")
class KiviStore(QuantizedStore):
    """``storage="kivi"``: QuantizedStore with KIVI's axes and defaults (2 bits, group 32, residual 128)."""

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128, key_axis: str = "channel",
                 value_axis: str = "token", **params):
        super().__init__(bits=bits, group_size=group_size, residual=residual, key_axis=key_axis,
                         value_axis=value_axis, **params)


class KiviCache(QuantCache):
    """KIVI-``bits``: keys per channel, values per token, ``residual`` recent tokens in full precision."""

    def __init__(self, bits: int = 2, group_size: int = 32, residual: int = 128, symmetric: bool = False,
                 residual_dtype: str = "float16", key_group_size: int | None = None,
                 value_group_size: int | None = None, keys: KeyMode = "post_rope", dequant_cache: bool = False):
        super().__init__(bits=bits, group_size=group_size, key_axis="channel", value_axis="token",
                         symmetric=symmetric, residual=residual, residual_dtype=residual_dtype,
                         key_group_size=key_group_size, value_group_size=value_group_size, keys=keys,
                         dequant_cache=dequant_cache)
