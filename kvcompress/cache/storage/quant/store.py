"""``storage=int8|int4|int2|kivi``: group-wise integer K and V with fp16 scales, packed codes and an
optional full-precision residual window of the most recent tokens.

One class; the YAMLs only differ in settings. ``int8`` / ``int4`` / ``int2``: per-token groups of
``group_size`` channels for keys and values. ``kivi`` (Liu et al., 2024): keys per channel (groups of
``group_size`` tokens), values per token, ``residual`` recent tokens in full precision. The residual
rule (``storage.residual.prefix_length``) depends only on the token count, so prefill, decode and any chunking
leave the same tokens in full precision; after n tokens at least ``residual`` recent keys are exact
(the original flushes keys in blocks of ``residual``, keeping 0..residual-1 exact). Without a residual and with
per-token groups every token is coded alone: the per-token codec (``codec.TokenQuantStore``); otherwise each side
is a ``codec.QuantSide`` behind the residual stage (``storage.residual``), eager and captured.
"""
from __future__ import annotations

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.checks import DTYPES, int_at_least, one_of
from kvcompress.cache.storage.fixed import FixedSlotCache
from kvcompress.cache.storage.quant.codec import QuantSide, TokenQuantStore
from kvcompress.cache.storage.quant.quantizer import QuantConfig
from kvcompress.cache.storage.residual import ResidualStore

DEFAULT_GROUP = 64


class QuantizedStore(ResidualStore):
    """K and V quantized separately (own axis and group size), positions as int32.

    ``group_size`` counts channels for per-token groups and tokens for per-channel groups (null: 64);
    ``key_group_size`` / ``value_group_size`` override it for one side. A per-token group never spans
    heads: one larger than head_dim is clipped to head_dim (so the defaults work on a head_dim-8 model).
    ``residual`` recent tokens stay in ``residual_dtype`` ("model" keeps the model's dtype).
    ``dequant_cache`` keeps a dequantized copy so ``read`` never dequantizes the whole history (faster
    eager decode; its bytes are reported and cancel the memory saving, see ``residual.Stage``).
    ``backend`` picks the kernels (None: ``KVC_KERNELS`` / auto; torch | triton).
    """

    def __init__(self, bits: int = 4, group_size: int | None = None, key_axis: str = "token",
                 value_axis: str = "token", symmetric: bool = False, residual: int = 0,
                 residual_dtype: str = "float16", key_group_size: int | None = None,
                 value_group_size: int | None = None, dequant_cache: bool = False, keys: str = "post_rope",
                 backend: str | None = None):
        int_at_least("storage.residual", residual, 0)
        self.residual_dtype = DTYPES[one_of("storage.residual_dtype", residual_dtype, DTYPES)]
        for name, g in (("group_size", group_size), ("key_group_size", key_group_size),
                        ("value_group_size", value_group_size)):
            if g is not None:
                int_at_least(f"storage.{name}", g, 1)
        self.bits, self.symmetric, self.residual = bits, bool(symmetric), residual
        self.dequant_cache, self.backend = bool(dequant_cache), backend
        self.wanted = {"key": (key_group_size or group_size or DEFAULT_GROUP, key_axis),
                       "value": (value_group_size or group_size or DEFAULT_GROUP, value_axis)}
        self.configs = {side: QuantConfig(bits, g, axis, self.symmetric) for side, (g, axis) in self.wanted.items()}
        super().__init__(keys)

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        for side, (g, axis) in self.wanted.items():
            if axis == "token":
                g = min(g, spec.head_dim)
            self.configs[side] = QuantConfig(self.bits, g, axis, self.symmetric)
            self.configs[side].check_head_dim(spec.head_dim, f"storage.{side}_group_size (or group_size)")

    def side_codecs(self) -> tuple[QuantSide, QuantSide]:
        return QuantSide(self.configs["key"], self.backend), QuantSide(self.configs["value"], self.backend)

    @property
    def per_token_codec(self) -> bool:
        """No residual, per-token groups on both sides, no dequantized copy: every token is coded alone (a codec)."""
        return not self.residual and not self.dequant_cache and all(c.axis == "token" for c in self.configs.values())

    def codec(self) -> TokenQuantStore:
        store = TokenQuantStore(self.configs, self.residual_dtype, self.keys, self.backend)
        if hasattr(self, "spec"):
            store.check(self.spec)
        return store

    def fresh(self, layer: int):
        """Per-layer stores: the per-token codec where it serves (``per_token_codec``), else the residual stage."""
        return self.codec().fresh(layer) if self.per_token_codec else super().fresh(layer)

    def static_form(self, capacity: int):
        """The per-token codec in fixed slots, or the residual stage's captured form (``residual.ResidualSlots``)."""
        if self.per_token_codec:
            return FixedSlotCache(self.codec(), capacity) if self.keys == "post_rope" else None
        return super().static_form(capacity)

    def report(self) -> dict[str, float | str]:
        return {"key_group_size": self.configs["key"].group_size, "value_group_size": self.configs["value"].group_size}
