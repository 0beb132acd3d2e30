"""Quantized caches: one quantized store per layer, keys stored after RoPE (default) or before it.

``QuantCache`` is a plain ``LayeredCache`` over the ``quant`` storage, so every setting here is a
storage setting; eviction or sharing caches get the same storage with ``storage="int4"`` etc.
"""
from __future__ import annotations

from kvcompress.cache.layered import KeyMode, LayeredCache


class QuantCache(LayeredCache):
    """Group-wise integer K/V (see ``kvcompress.cache.quant.store.QuantizedStore`` for the settings).

    ``keys="pre_rope"`` quantizes keys before rotation (KVQuant-style) and rotates the
    dequantized keys at their stored positions at attention time.
    """

    storage_name = "quant"

    def __init__(self, bits: int = 4, group_size: int = 64, key_axis: str = "token", value_axis: str = "token",
                 symmetric: bool = False, residual: int = 0, residual_dtype: str = "float16",
                 key_group_size: int | None = None, value_group_size: int | None = None,
                 keys: KeyMode = "post_rope", dequant_cache: bool = False):
        params = dict(bits=bits, group_size=group_size, key_axis=key_axis, value_axis=value_axis,
                      symmetric=symmetric, residual=residual, residual_dtype=residual_dtype,
                      key_group_size=key_group_size, value_group_size=value_group_size,
                      dequant_cache=dequant_cache)
        super().__init__(storage=self.storage_name, storage_params=params, keys=keys)
