"""KV-cache compression behind one interface (``base.KVCache``), composed from three axes:
``storage`` (how a token is held), ``policy`` (which tokens stay), ``layout`` (which layers own storage)."""
from kvcompress.cache.base import PAD_POSITION, CalibrationContext, KVCache, ModelSpec, Rotary, attention
from kvcompress.cache.composed import ComposedCache, FullCache
from kvcompress.cache.layout.base import Layout
from kvcompress.cache.policy.base import EvictionPolicy, Policy
from kvcompress.cache.storage.base import TokenStore
from kvcompress.cache.storage.dense import DenseStore

__all__ = [
    "PAD_POSITION", "CalibrationContext", "KVCache", "ModelSpec", "Rotary", "attention", "ComposedCache",
    "FullCache", "Layout", "EvictionPolicy", "Policy", "TokenStore", "DenseStore",
]
