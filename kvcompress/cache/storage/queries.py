"""Per-channel second moments of queries and keys on calibration text, for storages that weigh channels by
the queries that will read them (ThinK's channel scores, KVQuant's key sensitivity).

A storage never sees queries when it stores a token. At calibration it may: ``channel_moments(ctx)`` runs the
calibration text through a full cache (``ctx.nll``) that records, per layer, the mean square of every channel
of the rotated queries (per query head), of the keys before and after RoPE (per KV head), over real tokens.
The result is saved as ``channels-<ctx.key>.pt`` in ``ctx.cache_dir`` and reused.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from kvcompress.cache import artifacts
from kvcompress.cache.base import PAD_POSITION, KVCache
from kvcompress.cache.storage.dense import DenseStore

VERSION = 1


class _Moments(KVCache):
    """The full cache (a dense store per layer; the storage axis needs no composed cache), summing squares of query
    and key channels as they pass."""

    def setup(self, spec) -> None:
        super().setup(spec)
        L, D = spec.num_layers, spec.head_dim
        self.stores: list[DenseStore] = []
        self.sums = {"q": torch.zeros(L, spec.num_heads, D, dtype=torch.float64),
                     "k_pre": torch.zeros(L, spec.num_kv_heads, D, dtype=torch.float64),
                     "k_post": torch.zeros(L, spec.num_kv_heads, D, dtype=torch.float64)}
        self.count = torch.zeros(L, dtype=torch.float64)

    def _add(self, name: str, layer: int, x: Tensor, real: Tensor) -> None:
        self.sums[name][layer] += (x.double().square() * real[:, None, :, None]).sum((0, 2)).cpu()

    def reset(self, batch_size: int) -> None:
        self.stores = [DenseStore().fresh(layer) for layer in range(self.spec.num_layers)]

    def append(self, layer, k, v, pos, rope):
        real = pos < PAD_POSITION
        self._add("k_pre", layer, k, real)
        self._add("k_post", layer, rope.rotate(k, pos), real)
        self.stores[layer].append(k, v, pos, rope)

    def attend(self, layer, q, q_pos):
        real = q_pos < PAD_POSITION
        self._add("q", layer, q, real)
        self.count[layer] += real.sum().item()
        return self.stores[layer].attend(q, q_pos)[0]

    def tensors(self):
        return [t for s in self.stores for t in s.tensors()]

    @property
    def tokens_seen(self) -> int:
        return 0


def channel_moments(ctx, spec) -> dict[str, Tensor]:
    """{"q": (L, Hq, D), "k_pre": (L, Hkv, D), "k_post": (L, Hkv, D)} mean squares (float32), from ``ctx.nll``.

    Needs a calibration context that can run the model (``nll``); a context without it is a ValueError."""
    path = Path(ctx.cache_dir).expanduser() / f"channels-{ctx.key}.pt"
    current = lambda b: b.get("version") == VERSION and b.get("ctx_key") == ctx.key  # noqa: E731 (else measured again)
    blob, _ = artifacts.cached(path, lambda: {"version": VERSION, "ctx_key": ctx.key, "moments": measure(ctx, spec)},
                               "channel moments file", current)
    return blob["moments"]


def measure(ctx, spec) -> dict[str, Tensor]:
    """The mean squares of ``channel_moments``, measured by running the model over the calibration text."""
    if not hasattr(ctx, "nll"):
        raise ValueError("query-weighted calibration needs a calibration context that runs the model (ctx.nll); "
                         "this one only has K/V samples")
    rec = _Moments()
    rec.setup(spec)
    ctx.nll(rec)
    n = rec.count.clamp_min(1)[:, None, None]
    moments = {name: (s / n).float() for name, s in rec.sums.items()}
    artifacts.log(f"channel moments of queries and keys measured on {ctx.key}")
    return moments
