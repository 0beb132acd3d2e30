"""Token eviction: which tokens each layer keeps, over any storage (see ``base.EvictingCache``)."""
from kvcompress.cache.evict.base import EvictingCache
from kvcompress.cache.evict.h2o import H2OCache
from kvcompress.cache.evict.knorm import KeyNormCache
from kvcompress.cache.evict.pyramid import PyramidCache
from kvcompress.cache.evict.random import RandomCache
from kvcompress.cache.evict.snapkv import SnapKVCache
from kvcompress.cache.evict.streaming import StreamingCache
from kvcompress.cache.evict.tova import TOVACache

POLICIES = {
    "streaming": StreamingCache, "h2o": H2OCache, "snapkv": SnapKVCache, "tova": TOVACache,
    "knorm": KeyNormCache, "random": RandomCache, "pyramid": PyramidCache,
}

__all__ = ["EvictingCache", "H2OCache", "KeyNormCache", "PyramidCache", "RandomCache", "SnapKVCache",
           "StreamingCache", "TOVACache", "POLICIES"]
