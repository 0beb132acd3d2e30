"""``storage=int8|int4|int2|kivi``: group-wise integer K and V with fp16 scales, packed codes and an
optional full-precision residual window of the most recent tokens.

One class; the YAMLs only differ in settings. ``int8`` / ``int4`` / ``int2``: per-token groups of
``group_size`` channels for keys and values. ``kivi`` (Liu et al., 2024): keys per channel (groups of
``group_size`` tokens), values per token, ``residual`` recent tokens in full precision. The residual
rule (``part.QuantPart.split``) depends only on the token count, so prefill, decode and any chunking
leave the same tokens in full precision; after n tokens at least ``residual`` recent keys are exact
(the original flushes keys in blocks of ``residual``, keeping 0..residual-1 exact).
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.base import ModelSpec, attention_weights
from kvcompress.cache.checks import DTYPES, int_at_least, one_of
from kvcompress.cache.static.quant import StaticQuantKVCache
from kvcompress.cache.storage.base import PartsStore
from kvcompress.cache.storage.fixed import FixedSlotCache
from kvcompress.cache.storage.quant.codec import TokenQuantStore
from kvcompress.cache.storage.quant.part import QuantPart
from kvcompress.cache.storage.quant.quantizer import QuantConfig
from kvcompress.kernels import from_part, quant_attention

DEFAULT_GROUP = 64


class QuantizedStore(PartsStore):
    """K and V quantized separately (own axis and group size), positions as int32.

    ``group_size`` counts channels for per-token groups and tokens for per-channel groups (null: 64);
    ``key_group_size`` / ``value_group_size`` override it for one side. A per-token group never spans
    heads: one larger than head_dim is clipped to head_dim (so the defaults work on a head_dim-8 model).
    ``residual`` recent tokens stay in ``residual_dtype`` ("model" keeps the model's dtype).
    ``dequant_cache`` keeps a dequantized copy so ``read`` never dequantizes the whole history (faster
    eager decode; its bytes are reported and cancel the memory saving, see ``QuantPart``).
    """

    def __init__(self, bits: int = 4, group_size: int | None = None, key_axis: str = "token",
                 value_axis: str = "token", symmetric: bool = False, residual: int = 0,
                 residual_dtype: str = "float16", key_group_size: int | None = None,
                 value_group_size: int | None = None, dequant_cache: bool = False, keys: str = "post_rope"):
        int_at_least("storage.residual", residual, 0)
        one_of("storage.residual_dtype", residual_dtype, DTYPES)
        for name, g in (("group_size", group_size), ("key_group_size", key_group_size),
                        ("value_group_size", value_group_size)):
            if g is not None:
                int_at_least(f"storage.{name}", g, 1)
        self.bits, self.symmetric, self.residual = bits, bool(symmetric), residual
        self.residual_dtype, self.dequant_cache = residual_dtype, bool(dequant_cache)
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

    def clear_payload(self) -> None:
        part = lambda side: QuantPart(self.configs[side], self.residual, self.residual_dtype, self.dequant_cache)
        self.k, self.v = part("key"), part("value")
        self.dtype = None

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.dtype = k.dtype
        self.k.append(k)
        self.v.append(v)

    def attend(self, q: Tensor, q_pos: Tensor, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
        """A decode step reads the packed codes, scales and residual directly (``kernels.quant_attention``: Triton
        on CUDA, its PyTorch reference elsewhere), never a full-precision copy of the history. Prefill chunks,
        pre-RoPE keys and ``dequant_cache`` dequantize, then attend. Weights a policy asks for are computed beside
        the output: the same computation whether or not a policy observes it."""
        if q.shape[2] == 1 and self.keys == "post_rope" and not self.dequant_cache:
            out = quant_attention(q, q_pos, self.positions(), from_part(self.k), from_part(self.v))
            if not n_weights:
                return out, None
            k, _, pos = self.read()
            return out, attention_weights(q, k.to(q.dtype), q_pos, pos)
        return super().attend(q, q_pos, n_weights)

    @property
    def per_token_codec(self) -> bool:
        """No residual, per-token groups on both sides, no dequantized copy: every token is coded alone (a codec)."""
        return not self.residual and not self.dequant_cache and all(c.axis == "token" for c in self.configs.values())

    def codec(self) -> TokenQuantStore:
        store = TokenQuantStore(self.configs, DTYPES[self.residual_dtype], self.keys)
        if hasattr(self, "spec"):
            store.check(self.spec)
        return store

    def fresh(self, layer: int):
        """Per-layer stores: the per-token codec where it serves (``per_token_codec``), else K and V parts with the
        residual stage (``QuantPart``)."""
        return self.codec().fresh(layer) if self.per_token_codec else super().fresh(layer)

    def static_form(self, capacity: int):
        """The same codes in static-capacity buffers (captured decode), for post-RoPE keys without
        ``dequant_cache`` (pre-RoPE keys are rotated at read time: eager): the per-token codec in fixed slots, or the
        residual stage's form (``static.quant``)."""
        if self.keys != "post_rope" or self.dequant_cache:
            return None
        if self.per_token_codec:
            return FixedSlotCache(self.codec(), capacity)
        k, v = self.configs["key"], self.configs["value"]
        return StaticQuantKVCache(capacity, k.bits, k.group_size, k.symmetric, DTYPES[self.residual_dtype],
                                  residual=self.residual, key_axis=k.axis, value_axis=v.axis,
                                  value_group_size=v.group_size)

    def report(self) -> dict[str, float | str]:
        return {"key_group_size": self.configs["key"].group_size, "value_group_size": self.configs["value"].group_size}

    def full_precision_positions(self) -> tuple[Tensor, Tensor]:
        """Positions of the tokens whose K (and V) are held in full precision, (B, r) or (B, H, r)."""
        p = self.positions()
        return p[..., self.k.n_q :], p[..., self.v.n_q :]
