"""Imports every built-in storage module so that each registers itself with ``register_storage``."""
from kvcompress.cache import store  # noqa: F401  (dense)
