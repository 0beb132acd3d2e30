"""Quantized KV storage: group-wise int8/int4/int2 (``store``), KIVI (``kivi``), bitsandbytes (``bnb``)."""
from kvcompress.cache.quant.quantizer import QTensor, QuantConfig, dequantize, pack, quantize, unpack
from kvcompress.cache.quant.store import Int2Store, Int4Store, Int8Store, QuantizedStore

__all__ = ["QTensor", "QuantConfig", "dequantize", "pack", "quantize", "unpack",
           "QuantizedStore", "Int8Store", "Int4Store", "Int2Store"]
