"""``storage=think``: ThinK (Xu et al., 2024), key channel pruning per head: every key keeps only the
``1 - prune_fraction`` most important channels of its KV head (after RoPE), values stay whole.

Channel scores, per layer, KV head h and channel c: ThinK's ``||Q_c|| * ||K_c||`` (the norm of channel c's
contribution to the attention scores), with the queries summed over the query heads that read h. A storage
sees no query when it stores a token, so the scores are *calibrated*: mean squares of the rotated queries and
keys on the calibration text (``queries.channel_moments``; ``score: query_key``), or of the keys alone
(``score: key``: queries assumed isotropic, for contexts that cannot run the model). Differences from the
paper: ThinK picks channels per input from the last ``window`` queries of the prompt and prunes the prompt's
keys after prefill; here one channel set per (layer, head) is fixed at calibration and every key, prompt or
decoded, is stored pruned (so the cache-in-the-loop perplexity sees pruned keys from the first chunk on).

Attention is exact over what is held: a pruned key is read back with zeros in its pruned channels, so
``q . k`` is the kept channels' sum (scale 1/sqrt(head_dim) unchanged, as in ThinK).
``bits`` (8 | 4 | 2) stores the kept channels KIVI-style ("ThinK over KIVI"): keys per channel in groups of
``group_size`` tokens, values per token, the most recent ``residual`` tokens in fp16.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

from kvcompress.cache import artifacts
from kvcompress.cache.base import ModelSpec
from kvcompress.cache.checks import DTYPES, dtype_of, int_at_least, number_in, one_of
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.quant.codec import QuantSide
from kvcompress.cache.storage.quant.quantizer import QuantConfig
from kvcompress.cache.storage.queries import channel_moments
from kvcompress.cache.storage.residual import ResidualStore

SCORES = ("query_key", "key")


class ThinKStore(CodecStore):
    def __init__(self, prune_fraction: float = 0.4, score: str = "query_key", dtype: str = "float16",
                 bits: int | None = None, group_size: int = 32, residual: int = 128, keys: str = "post_rope"):
        number_in("storage.prune_fraction", prune_fraction, 0, 1, open_hi=True)
        one_of("storage.score", score, SCORES)
        one_of("storage.dtype", dtype, DTYPES)
        one_of("storage.bits", bits, (None, 8, 4, 2))
        int_at_least("storage.group_size", group_size, 1)
        int_at_least("storage.residual", residual, 0)
        one_of("storage.keys", keys, ("post_rope",))  # channels of rotated keys: a pruned pair cannot be rotated
        self.prune_fraction, self.score, self.dtype_name = float(prune_fraction), score, dtype
        self.bits, self.group_size, self.residual = bits, group_size, residual
        self.kept: list[Tensor] | None = None  # per layer (Hkv, n_keep) channel indices, ascending
        self.stats: dict[str, float | str] = {}
        super().__init__("post_rope")

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        D = spec.head_dim
        n = D - round(self.prune_fraction * D)
        if self.bits:
            per = 8 // self.bits  # kept channels pack whole bytes
            n = min(D, -(-n // per) * per)
            if D % per:
                raise ValueError(f"storage.bits={self.bits} packs {per} channels a byte: head_dim={D} is no multiple")
        self.n_keep = max(1, n)
        self.value_group = min(self.group_size, D)
        if self.bits and D % self.value_group:
            raise ValueError(f"storage.group_size={self.group_size} must divide head_dim={D} (values per token)")

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        path = Path(ctx.cache_dir).expanduser() / f"think-{ctx.key}-{self.score}.pt"
        blob, reused = artifacts.cached(path, lambda: {"ctx_key": ctx.key, "score": self.score,
                                                       "scores": self._scores(ctx)}, "ThinK channel scores")
        self.stats = {"calibration_reused": float(reused), "calibration_file": str(path)}
        top = blob["scores"].topk(self.n_keep, dim=-1).indices  # (L, Hkv, n_keep)
        self.kept = [t.sort(-1).values.contiguous() for t in top]

    def _scores(self, ctx) -> Tensor:
        """(L, Hkv, D) channel scores."""
        H = self.spec.num_kv_heads
        if self.score == "query_key":
            m = channel_moments(ctx, self.spec)
            q = m["q"].sqrt().unflatten(1, (H, -1)).sum(2)  # query heads of each KV head, summed
            return q * m["k_post"].sqrt()
        rows = []
        for k, _, pos in ctx.kv_samples():  # keys alone; rotated when the context has the model's RoPE
            k = k.float() if ctx.rope is None else ctx.rope.rotate(k.float(), pos)
            rows.append(k.square().mean((0, 2)).sqrt())
        return torch.stack(rows)

    # -- tokens: kept key channels and whole values, a per-token codec ----------------------------------------
    def fresh(self, layer: int):
        """Per-layer stores: this codec, or with ``bits`` the kept channels in KIVI-style parts (``ThinKQuantParts``,
        a residual stage: per-channel key groups span tokens)."""
        return ThinKQuantParts(self, layer) if self.bits else super().fresh(layer)

    def static_form(self, capacity: int):
        return None if self.bits else super().static_form(capacity)

    def _idx(self, x: Tensor) -> Tensor:
        if self.kept is None:
            raise RuntimeError("storage=think needs calibrate(ctx) before use")
        idx = self.kept[self.layer].to(x.device)
        return idx[None, :, None].expand(x.shape[0], -1, x.shape[2], -1)

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        dt = dtype_of("storage.dtype", self.dtype_name) or k.dtype
        return {"k": k.gather(-1, self._idx(k)).to(dt), "v": v.to(dt)}

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        return self.unprune(parts["k"].to(dtype)), parts["v"].to(dtype)

    def unprune(self, kk: Tensor) -> Tensor:
        """Kept channels (B, H, T, n_keep) back to head_dim, zeros in the pruned ones (``q . k`` sums the kept)."""
        k = kk.new_zeros(*kk.shape[:3], self.spec.head_dim)
        return k.scatter_(-1, self._idx(kk), kk)

    def calibration_tensors(self) -> list[Tensor]:
        return list(self.kept or [])

    def report(self) -> dict[str, float | str]:
        return {"think_kept_channels": float(getattr(self, "n_keep", 0)), "think_score": self.score, **self.stats}


class ThinKQuantParts(ResidualStore):
    """``storage=think`` with ``bits``: the kept key channels and the values KIVI-style behind the residual stage (keys
    per channel in groups of ``group_size`` tokens, values per token, ``residual`` recent tokens in fp16)."""

    packed_decode = False  # keys hold the kept channels only: decode (zeros in the pruned ones), then attend

    def __init__(self, think: ThinKStore, layer: int):
        self.think, self.spec, self.residual = copy.copy(think), think.spec, think.residual
        self.think.layer = layer
        super().__init__("post_rope")
        self.layer = layer

    def side_codecs(self) -> tuple[QuantSide, QuantSide]:
        t = self.think
        return QuantSide(QuantConfig(t.bits, t.group_size, "channel")), QuantSide(QuantConfig(t.bits, t.value_group))

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        super().append_payload(k.gather(-1, self.think._idx(k)), v, pos)

    def read_payload(self) -> tuple[Tensor, Tensor]:
        kk, v = super().read_payload()
        return self.think.unprune(kk), v
