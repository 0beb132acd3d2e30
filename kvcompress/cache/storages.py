"""Imports every built-in storage module so that each registers itself with ``register_storage``."""
from kvcompress.cache import store  # noqa: F401  (dense)
from kvcompress.cache.quant import bnb, kivi  # noqa: F401  (bnb_int8/nf4/fp4, kivi)
from kvcompress.cache.quant import store as quant_store  # noqa: F401  (quant, int8, int4, int2)
