"""Latents (``storage=latent``) in static-capacity buffers: the calibrated low-rank cache, captured.

Per layer: the latents of every token, (B, G, capacity, r) for each of ``key`` and ``value`` (or one ``joint``),
G = Hkv (``per_head``) or 1, r the layer's rank, in ``latent_dtype``; with ``rope_dims`` also the rotated
uncompressed dims of every layer, (L, B, Hkv, capacity, rope_dims). New tokens are encoded and read by a
per-layer ``LatentStore`` of the calibrated store (``fresh(layer)``: the same code and the same calibrated
projections, converted once to the model's device and dtype, as the eager store does), so the latents are
rounded exactly as the eager store rounds them; only where they are held differs. Attention runs over the
capacity at the stored positions (pre-RoPE keys are rotated at them; empty slots hold ``PAD_POSITION`` and are
masked by ``key_pos <= query_pos``): reconstructed keys and values, or the absorbed path when ``absorb`` is on,
with the fused ``kernels.latent_attention`` where the eager store uses it (Triton on CUDA reads the token
count on the device, so the launch can be captured).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec, Rotary, attention
from kvcompress.cache.checks import DTYPES
from kvcompress.cache.storage.fixed import FixedSlotCache
from kvcompress.kernels import resolve

if TYPE_CHECKING:
    from kvcompress.cache.storage.latent.store import LatentStore


class Unrotated:
    """What the base's ``append`` rotates keys with here: nothing (latent keys are projected before RoPE)."""

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        return x


class StaticLatentKVCache(FixedSlotCache):
    """The latent storage's tokens of every layer in fixed buffers of ``capacity`` tokens (captured-decode form).

    Made by ``LatentStore.static_form(capacity)`` from a store that is (or will be, before the first append)
    calibrated; its projections are shared, never refitted. Dense latents only (``latent_bits`` has no static
    form: the store returns None).
    """

    slot_addressable = False  # per-layer latent buffers of per-layer ranks: not an eviction policy's slots (yet)

    def __init__(self, store: LatentStore, capacity: int, device: torch.device | str | None = None,
                 backend: str | None = None):
        super().__init__(store, capacity, device=device)
        self.store, self.backend = store, backend
        self.codecs: list[LatentStore] = []
        self.lat: list[dict[str, Tensor]] = []
        self.rope_part: Tensor | None = None
        self.rope: Rotary | None = None
        self.new_pos: Tensor | None = None

    def setup(self, spec: ModelSpec) -> None:
        if self.store.latent_bits is not None:
            raise ValueError("the static latent cache holds dense latents: storage.latent_bits must be null")
        super().setup(spec)

    def payload(self) -> list[Tensor]:
        return [t for lat in self.lat for t in lat.values()] + ([] if self.rope_part is None else [self.rope_part])

    def allocate_payload(self, dtype: torch.dtype, device: torch.device) -> None:
        store, s = self.store, self.spec
        if store.layers is None:
            raise RuntimeError("storage=latent needs calibrate(ctx) before use")
        if len(store.layers) != s.num_layers:
            raise ValueError(f"calibration has {len(store.layers)} layers, the model {s.num_layers}")
        self.codecs = [store.fresh(layer) for layer in range(s.num_layers)]
        for codec in self.codecs:
            codec._prepare(device, dtype)  # the calibrated projections on this device, once (not inside a step)
        held = DTYPES[store.latent_dtype] or dtype
        self.lat = [{name: torch.zeros((self.batch_size, p.basis.shape[0], self.capacity, p.rank), dtype=held,
                                       device=device) for name, p in projs.items()} for projs in store.layers]
        rd = store.pca.rope_dims
        self.rope_part = None if not rd else torch.zeros(
            (s.num_layers, self.batch_size, s.num_kv_heads, self.capacity, rd), dtype=held, device=device)

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        """The base's index and positions; keys reach ``write`` before RoPE, with the rotary kept for the codec."""
        self.rope, self.new_pos = rope, pos
        super().append(layer, k, v, pos, Unrotated())

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        codec = self.codecs[layer]
        codec.rope = self.rope
        latents, rope_part = codec.encode(k, v, self.new_pos)
        for name, c in latents.items():
            buf = self.lat[layer][name]
            buf.index_copy_(2, slots, c.to(buf.dtype))
        if rope_part is not None:
            self.rope_part[layer].index_copy_(2, slots, rope_part)

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        codec, lat = self.codecs[layer], self.lat[layer]
        pos = self.pos
        ck, cv = (lat["joint"], lat["joint"]) if "joint" in lat else (lat["key"], lat["value"])
        rope_part = None if self.rope_part is None else self.rope_part[layer]
        if not codec.absorb:
            dtype = codec.proj["value"].basis.dtype
            k, v = codec.reconstruct(ck.to(dtype), cv.to(dtype), pos, rope_part)
            return attention(q, k.to(q.dtype), v.to(q.dtype), q_pos, pos)
        ck, cv = ck.to(q.dtype), cv.to(q.dtype)
        if codec.fused():
            lengths = None
            if resolve(q.device, self.backend) == "triton":  # [n_q of K, n_q of V, T]: dense latents, T held
                lengths = torch.cat([self.index.new_zeros(2), self.index.view(1)]).to(torch.int32)
            return codec.fused_attention(q, q_pos, pos, ck, cv, self.backend, lengths)
        return codec.absorbed_attention(q, q_pos, pos, ck, cv, rope_part)[0]

    def calibration_tensors(self) -> list[Tensor]:
        return self.store.calibration_tensors()

