"""KV-cache strategies behind one interface (see ``base.KVCache``)."""
from kvcompress.cache.base import PAD_POSITION, CalibrationContext, KVCache, ModelSpec, Rotary, attention
from kvcompress.cache.full import FullCache
from kvcompress.cache.layered import LayeredCache
from kvcompress.cache.store import DenseStore, TokenStore, register_storage, storage_factory

__all__ = [
    "PAD_POSITION", "CalibrationContext", "KVCache", "ModelSpec", "Rotary", "attention",
    "FullCache", "LayeredCache", "DenseStore", "TokenStore", "register_storage", "storage_factory",
]
