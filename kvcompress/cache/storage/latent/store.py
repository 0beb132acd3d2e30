"""``storage=latent``: a calibrated rank-r latent per token (DeepSeek MLA-style, after training, the way
Palu and MHA2MLA do it).

Per layer, keys (before RoPE) and values are projected onto their calibrated principal components
and only the rank-r latent of each token is stored:

* separate K and V latents with their own ranks, or one joint KV latent (``joint_kv``, as in MLA);
* latents per KV head (``per_head``, which also lets a policy keep different tokens per head) or across
  the heads of a layer (default);
* ranks fixed (``rank``), a fraction of the dimension (``rank_fraction``), or per layer by explained
  variance (``rank=auto``, ``energy``); ``key_rank`` / ``value_rank`` override one side;
* decoupled RoPE (``rope_dims``): that many rotary dims per head (whole frequency pairs, highest
  frequencies by default) are kept uncompressed; with ``nope=true`` the compressed rest is *not*
  rotated (MHA2MLA's partial RoPE, a change to the model) so its keys can be absorbed too;
* keys projected before RoPE (default) and rotated after reconstruction at their stored positions,
  or after RoPE (``keys=post_rope``, to show why pre-RoPE matters);
* ``absorb=true``: attention in latent space. Values: out = (P @ c_v) @ U_v^T + mean. Keys whose
  compressed part is not rotated afterwards (``nope`` or ``post_rope``): U_k is folded into the query.
  Rotated compressed keys cannot be absorbed (rotation depends on each key's position), so they are
  reconstructed; the value side is absorbed regardless. Equal to ``absorb=false`` within fp tolerance;
* ``latent_bits``: latents quantized per token by the quantization storage's ``QuantPart``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec, attention_tail_weights
from kvcompress.cache.buffers import GrowingBuffer, gather_tokens
from kvcompress.cache.checks import DTYPES, number_in, one_of
from kvcompress.cache.static.latent import StaticLatentKVCache
from kvcompress.cache.storage.base import TokenStore
from kvcompress.cache.storage.latent.absorbed import Projection, absorbed_key_scores, gqa_view, latent_attention
from kvcompress.cache.storage.latent.calibrate import (
    KEY_MODES,
    ROPE_SELECT,
    PCASettings,
    choose_rank,
    load_or_fit,
    rope_split,
    to_groups,
)
from kvcompress.cache.storage.latent.latents import Latents
from kvcompress.kernels import from_part
from kvcompress.kernels import latent_attention as latent_attention_kernel

Rank = int | float | str | None


def _check_rank_spec(name: str, r: Rank) -> None:
    ok = r is None or r == "auto" or (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or (
        isinstance(r, float) and 0.0 < r <= 1.0)
    if not ok:
        raise ValueError(f"storage.{name} must be an int >= 1, a fraction in (0, 1], 'auto' or null, got {r!r}")


class LatentStore(TokenStore):
    """Stores a calibrated rank-r latent per token (plus ``rope_dims`` uncompressed rotary dims per head)."""

    values_writable = False  # values live in a (possibly joint) latent: no ``update_values`` (CaM)

    def __init__(self, rank: Rank = None, rank_fraction: float | None = 0.5, energy: float = 0.95,
                 key_rank: Rank = None, value_rank: Rank = None, joint_kv: bool = False, per_head: bool = False,
                 rope_dims: int = 0, rope_select: str = "high", nope: bool = False, keys: str = "pre_rope",
                 center: bool = True, absorb: bool = False, latent_dtype: str = "float16",
                 latent_bits: int | None = None, latent_group_size: int | None = None,
                 calibration_file: str | None = None):
        for name, r in (("rank", rank), ("key_rank", key_rank), ("value_rank", value_rank)):
            _check_rank_spec(name, r)
        if rank is None and rank_fraction is None:
            raise ValueError("set storage.rank (an int or 'auto') or storage.rank_fraction (in (0, 1])")
        if rank_fraction is not None:
            number_in("storage.rank_fraction", rank_fraction, 0, 1, open_lo=True)
        number_in("storage.energy", energy, 0, 1, open_lo=True)
        if joint_kv and (key_rank is not None or value_rank is not None):
            raise ValueError("storage.key_rank / value_rank apply to separate latents; with joint_kv=true set rank "
                             "or rank_fraction")
        one_of("storage.keys", keys, KEY_MODES)
        one_of("storage.rope_select", rope_select, ROPE_SELECT)
        if not isinstance(rope_dims, int) or rope_dims < 0 or rope_dims % 2:
            raise ValueError(f"storage.rope_dims must be an even int >= 0 (whole rotary pairs), got {rope_dims!r}")
        if nope and (rope_dims == 0 or keys == "post_rope"):
            raise ValueError("storage.nope=true (compressed key dims unrotated) needs rope_dims > 0 and keys=pre_rope")
        one_of("storage.latent_dtype", latent_dtype, DTYPES)
        one_of("storage.latent_bits", latent_bits, (None, 8, 4, 2))
        if latent_group_size is not None and (not isinstance(latent_group_size, int) or latent_group_size < 1):
            raise ValueError(f"storage.latent_group_size must be an int >= 1 or null, got {latent_group_size!r}")
        whole, whole_name = (rank, "rank") if rank is not None else (float(rank_fraction), "rank_fraction")
        kr, vr = (key_rank if key_rank is not None else whole), (value_rank if value_rank is not None else whole)
        self.specs: dict[str, Rank] = {"joint": whole} if joint_kv else {"key": kr, "value": vr}
        self.setting = {"joint": whole_name, "key": "key_rank" if key_rank is not None else whole_name,
                        "value": "value_rank" if value_rank is not None else whole_name}
        self.energy, self.absorb, self.nope = float(energy), absorb, nope
        self.pca = PCASettings(keys, rope_dims, rope_select, per_head, joint_kv, center)
        self.latent_dtype, self.latent_bits, self.latent_group_size = latent_dtype, latent_bits, latent_group_size
        self.calibration_file = calibration_file
        self.layers: list[dict[str, Projection]] | None = None
        self.stats: dict[str, float | str] = {}
        self._device: tuple | None = None
        super().__init__("pre_rope")  # the base never rotates: this store rotates what it reconstructs

    @property
    def ragged_heads(self) -> bool:
        return self.pca.per_head  # a latent across heads cannot keep different tokens per head

    # -- validation before weights load --------------------------------------------------------
    def dims(self, spec: ModelSpec) -> dict[str, tuple[int, str]]:
        """Input dimension of each latent and how it is made up (for error messages)."""
        H, D, rd = spec.num_kv_heads, spec.head_dim, self.pca.rope_dims
        heads = 1 if self.pca.per_head else H
        where = "per-head" if self.pca.per_head else f"kv_heads={H} x"
        k = (heads * (D - rd), f"{where} (head_dim={D} - rope_dims={rd})")
        v = (heads * D, f"{where} head_dim={D}")
        if self.pca.joint_kv:
            return {"joint": (k[0] + v[0], f"keys {k[1]} + values {v[1]}")}
        return {"key": k, "value": v}

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if self.pca.rope_dims >= spec.head_dim:
            raise ValueError(f"storage.rope_dims={self.pca.rope_dims} must be < head_dim={spec.head_dim}")
        for name, (n, what) in self.dims(spec).items():
            r = self.specs[name]
            if isinstance(r, int) and not isinstance(r, bool) and not 1 <= r <= n:
                raise ValueError(f"storage.{self.setting[name]}={r} is outside [1, {n}] for the {name} latent ({what})")
            if n % self.unit():
                raise ValueError(f"storage.latent_bits={self.latent_bits} with latent_group_size="
                                 f"{self.latent_group_size} needs latent dimensions that are multiples of "
                                 f"{self.unit()}; the {name} latent has {n}")

    def unit(self) -> int:
        """Ranks are multiples of this: whole packed bytes and whole quantization groups."""
        return math.lcm(8 // self.latent_bits, self.latent_group_size or 1) if self.latent_bits else 1

    # -- calibration (once, for every layer; per-layer stores share it) ------------------------------
    group_calibration = True  # layout=xkv: one PCA basis per group of layers, each layer its own latent

    def calibrate(self, ctx, groups: list[list[int]] | None = None) -> None:
        fitted, self.stats = load_or_fit(ctx, self.pca, self.calibration_file, groups)
        if len(fitted) != self.spec.num_layers:
            raise ValueError(f"calibration has {len(fitted)} layers, the model {self.spec.num_layers}")
        self.layers, shared = [], {}  # layers of one group share one fit, hence one projection (counted once)
        for layer in fitted:
            projs = {}
            for name, fit in layer.items():
                r = choose_rank(self.specs[name], fit["eig"], self.energy)
                r = min(fit["eig"].shape[-1], -(-r // self.unit()) * self.unit())
                projs[name] = shared.setdefault((id(fit), name), Projection(fit["basis"][..., :r], fit["mean"],
                                                                            self.spec.num_kv_heads))
            self.layers.append(projs)
        self._device = None

    def ranks(self) -> dict[str, list[int]]:
        return {name: [p[name].rank for p in self.layers] for name in self.layers[0]}

    def _prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._device != (device, dtype):
            projs = {n: p.to(device, dtype) for n, p in self.layers[self.layer].items()}
            if "joint" in projs:  # key / value views of a joint projection: rows [:n_k] make key dims
                j = projs["joint"]
                n_k = (self.spec.head_dim - self.pca.rope_dims) * j.heads // j.basis.shape[0]
                projs["key"] = Projection(j.basis[:, :n_k], j.mean[:, :n_k], j.heads)
                projs["value"] = Projection(j.basis[:, n_k:], j.mean[:, n_k:], j.heads)
            self.proj = projs
            keep, comp = rope_split(self.spec.head_dim, self.pca.rope_dims, self.pca.rope_select)
            self.keep_idx, self.comp_idx = keep.to(device), comp.to(device)
            self._device = (device, dtype)

    # -- tokens ------------------------------------------------------------------------------------
    def clear_payload(self) -> None:
        if self.layers is None:
            self.lat, self.rope_part = {}, GrowingBuffer()
            return
        new = lambda r: Latents(r, self.latent_dtype, self.latent_bits, self.latent_group_size)
        self.lat = {n: new(p.rank) for n, p in self.layers[self.layer].items()}
        self.rope_part = GrowingBuffer()  # (B, Hkv, T, rope_dims) uncompressed rotary dims, rotated once
        self._device = None

    def append_payload(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        if self.layers is None:
            raise RuntimeError("storage=latent needs calibrate(ctx) before use")
        latents, rope_part = self.encode(k, v, pos)
        for name, c in latents.items():
            self.lat[name].append(c)
        if rope_part is not None:
            self.rope_part.append(rope_part)

    def encode(self, k: Tensor, v: Tensor, pos: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """New tokens' latents by name (``joint``, or ``key`` and ``value``), in the projections' dtype, and their
        rotated uncompressed dims (B, Hkv, T, rope_dims) in the latent dtype (None without ``rope_dims``)."""
        self._prepare(k.device, k.dtype)
        rotated = self.rope.rotate(k, pos) if self.pca.keys == "post_rope" or self.pca.rope_dims else None
        rope_part = None
        if self.pca.rope_dims:
            rope_part = rotated[..., self.keep_idx].to(DTYPES[self.latent_dtype] or k.dtype)
        kc = (rotated if self.pca.keys == "post_rope" else k)[..., self.comp_idx]
        if self.pca.joint_kv:
            G = self.proj["joint"].basis.shape[0]
            return {"joint": self.proj["joint"].down(torch.cat([to_groups(kc, G), to_groups(v, G)], -1))}, rope_part
        return {"key": self.proj["key"].encode_heads(kc), "value": self.proj["value"].encode_heads(v)}, rope_part

    def _latents(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if "joint" in self.lat:
            c = self.lat["joint"].read(dtype)
            return c, c
        return self.lat["key"].read(dtype), self.lat["value"].read(dtype)

    def _stored_latents(self, dtype: torch.dtype):
        """The latents as held: dense tensors, or the quantized parts as packed sides (read inside the kernel)."""
        side = lambda lat: from_part(lat.quant) if lat.quant is not None else lat.read(dtype)
        if "joint" in self.lat:
            c = side(self.lat["joint"])
            return c, c
        return side(self.lat["key"]), side(self.lat["value"])

    def _rope_dims(self) -> Tensor | None:
        return self.rope_part.view() if self.pca.rope_dims else None

    def _keys(self, ck: Tensor, pos: Tensor, dtype: torch.dtype, rope_part: Tensor | None) -> Tensor:
        """Rotated full keys (B, Hkv, T, D) from key latents and the uncompressed rotary dims."""
        kc = self.proj["key"].decode_heads(ck)
        if not self.pca.rope_dims:
            k = kc
        else:
            k = kc.new_zeros(*kc.shape[:3], self.spec.head_dim)
            k[..., self.comp_idx] = kc
        if self.pca.keys == "pre_rope" and not self.nope:
            k = self.rope.rotate(k, pos)  # rope dims are 0 here; rotation keeps pairs, so they stay 0
        if self.pca.rope_dims:
            k[..., self.keep_idx] = rope_part.to(dtype)
        return k

    def read_payload(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # ``read`` is overridden: keys are rotated here, by part

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        pos = self.positions()
        ck, cv = self._latents(self.proj["value"].basis.dtype)
        return *self.reconstruct(ck, cv, pos, self._rope_dims()), pos

    def reconstruct(self, ck: Tensor, cv: Tensor, pos: Tensor, rope_part: Tensor | None) -> tuple[Tensor, Tensor]:
        """Rotated keys and values (B, Hkv, T, D) from latents read in one dtype, at key positions ``pos``."""
        return self._keys(ck, pos, ck.dtype, rope_part), self.proj["value"].decode_heads(cv)

    def attend(self, q: Tensor, q_pos: Tensor, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
        if not self.absorb:
            k, v, pos = self.read()
            return attention_tail_weights(q, k.to(q.dtype), v.to(q.dtype), q_pos, pos, n_weights)
        pos = self.positions()
        if self.fused(n_weights):
            return self.fused_attention(q, q_pos, pos, *self._stored_latents(q.dtype)), None
        out, p = self.absorbed_attention(q, q_pos, pos, *self._latents(q.dtype), self._rope_dims())
        return out, (p[:, :, -n_weights:] if n_weights > 0 else None)

    def fused(self, n_weights: int = 0) -> bool:
        """Absorbed attention in one kernel: keys not rotated after reconstruction, no rope dims, no weights."""
        return self.absorb and self.pca.keys == "post_rope" and not self.pca.rope_dims and n_weights == 0

    def fused_attention(self, q: Tensor, q_pos: Tensor, pos: Tensor, ck, cv, backend: str | None = None,
                        lengths: Tensor | None = None) -> Tensor:
        """U_k folded into the query, P applied to the stored (maybe quantized) latents, one up-projection
        (``kernels.latent_attention``; ``lengths``: the latents are static-capacity buffers)."""
        kp, vp = self.proj["key"], self.proj["value"]
        return latent_attention_kernel(q, q_pos, pos, ck, cv, kp.head_basis(), vp.head_basis(), vp.head_mean(),
                                       backend=backend, lengths=lengths)

    def absorbed_attention(self, q: Tensor, q_pos: Tensor, pos: Tensor, ck: Tensor, cv: Tensor,
                           rope_part: Tensor | None) -> tuple[Tensor, Tensor]:
        """Attention in latent space over latents read in q's dtype: the output and the softmax weights."""
        kp, H = self.proj["key"], self.spec.num_kv_heads
        if self.pca.keys == "post_rope" or self.nope:  # fold U_k into the query; rope dims attend as they are
            scores = absorbed_key_scores(q[..., self.comp_idx], ck, kp)
            if self.pca.rope_dims:
                kr = rope_part.to(q.dtype)
                scores = scores + gqa_view(q[..., self.keep_idx], H) @ kr.transpose(-1, -2)
        else:  # rotated compressed keys: reconstructed (position-dependent rotation cannot be absorbed)
            scores = gqa_view(q, H) @ self._keys(ck, pos, q.dtype, rope_part).transpose(-1, -2)
        return latent_attention(q, q_pos, pos, cv, self.proj["value"], scores)

    def keep_payload(self, idx: Tensor) -> None:
        for lat in self.lat.values():
            lat.keep(idx)
        if self.rope_part.data is not None:
            self.rope_part.replace(gather_tokens(self.rope_part.view(), idx))

    # -- accounting --------------------------------------------------------------------------------
    def payload_tensors(self) -> list[Tensor]:
        return [t for lat in self.lat.values() for t in lat.tensors()] + self.rope_part.tensors()

    def payload_reserved(self) -> list[Tensor]:
        return [t for lat in self.lat.values() for t in lat.reserved_tensors()] + self.rope_part.reserved()

    def static_form(self, capacity: int):
        """Dense latents (any ranks, ``joint_kv``, ``per_head``, ``rope_dims``, ``nope``, ``keys``, ``absorb``) in
        static-capacity buffers (``kvcompress.cache.static.latent``), sharing this store's calibrated projections.
        None with ``latent_bits``: quantized latents (a growing quantized part) have no static form yet."""
        if self.latent_bits is not None:
            return None
        return StaticLatentKVCache(self, capacity)

    def calibration_tensors(self) -> list[Tensor]:
        unique = {id(p): p for layer in self.layers or [] for p in layer.values()}.values()
        return [t for p in unique for t in (p.basis, p.mean)]

    def report(self) -> dict[str, float | str]:
        out = {f"{name}_rank_mean": sum(r) / len(r) for name, r in self.ranks().items()} if self.layers else {}
        return {**out, **self.stats}
