"""Static-capacity caches: dense, and per-token quantized, in buffers allocated once (the captured-decode form).

Every buffer is allocated once (at the first append after ``reset`` of a new batch size, in the
arriving keys' dtype and device) to ``capacity`` tokens: the payload (dense K/V (L, B, Hkv, capacity,
D), or packed codes and scales), positions (B, capacity) filled with ``PAD_POSITION`` (invisible to
every real query), and a write index, a 0-d device tensor; later resets clear them in place, so
addresses stay fixed. A forward advances the index by its T tokens in place (at the first layer) and
every layer writes them to slots ``index - T + [0, T)`` with ``index_copy_``, so a step has fixed
shapes, no host synchronisation and no Python branch on data: the whole step (embedding to logits)
can be recorded once and replayed (``kvcompress.engine.static``). Attention runs over the capacity with the
mask ``key_pos <= query_pos`` (empty slots are masked), so the result equals the growing cache's. A storage
offers its static form through ``static_form(capacity)``.
"""
from kvcompress.cache.static.dense import StaticKVCache
from kvcompress.cache.static.quant import StaticQuantKVCache

__all__ = ["StaticKVCache", "StaticQuantKVCache"]
