"""Static-capacity caches: the captured-decode form of a cache, in buffers allocated once.

Every buffer is allocated once (at the first append after ``reset`` of a new batch size, in the arriving keys'
dtype and device) to ``capacity`` tokens: the payload, positions (B, capacity) filled with ``PAD_POSITION``
(invisible to every real query), and a write index, a 0-d device tensor; later resets clear them in place, so
addresses stay fixed. A forward advances the index by its T tokens in place (at the first layer) and every layer
writes them with ``index_copy_``, so a single-token step has fixed shapes, no host synchronisation and no Python
branch on data: the whole step (embedding to logits) can be recorded once and replayed
(``kvcompress.engine.static``). Attention runs over the capacity with the mask ``key_pos <= query_pos`` (empty
slots are masked), so the result equals the growing cache's within fp tolerance. The forms:

* ``storage.fixed.FixedSlotCache``: every codec storage (``storage.codec``: dense, per-token int8/int4/int2, ThinK,
  a user's codec) in fixed slots, generically; ``StaticKVCache`` is the dense one (the full cache);
* ``quant.StaticQuantKVCache``: the quantized storages' residual stage (KIVI: per-channel key groups and the
  full-precision residual, flushed by a device-side flag);
* ``latent.StaticLatentKVCache``: the latent storage (dense latents; not ``latent_bits``);
* ``evict.StaticEvictionCache``: a fixed-budget eviction policy over a slot-addressable form (a codec in fixed
  slots), ``budget + slack`` slots that never move.

A storage offers its form through ``static_form(capacity)``, a policy through ``static_form(storage, capacity)``;
``ComposedCache.static_form`` asks the right one (None: the combination decodes eagerly).
"""
from kvcompress.cache.storage.dense import StaticKVCache

__all__ = ["StaticKVCache"]
