"""Latent low-rank KV cache (DeepSeek MLA-style, after training, the way Palu and MHA2MLA do it).

Per layer, keys (before RoPE) and values are projected onto their calibrated principal components
and only the rank-r latent of each token is stored:

* separate K and V latents with their own ranks, or one joint KV latent (``joint_kv``, as in MLA);
* latents per KV head (``per_head``) or across the heads of a layer (default);
* ranks fixed (``rank``), a fraction of the dimension (``rank_fraction``), or per layer by explained
  variance (``rank=auto``, ``energy``); ``key_rank`` / ``value_rank`` override one side;
* decoupled RoPE (``rope_dims``): that many rotary dims per head (whole frequency pairs, highest
  frequencies by default) are kept uncompressed; with ``nope=true`` the compressed rest is *not*
  rotated (MHA2MLA's partial RoPE, a change to the model) so its keys can be absorbed too;
* keys stored before RoPE (default) and rotated after reconstruction at their stored positions,
  or projected after RoPE (``keys=post_rope``, to show why pre-RoPE matters);
* ``absorb=true``: attention in latent space. Values: out = (P @ c_v) @ U_v^T + mean. Keys whose
  compressed part is not rotated afterwards (``nope`` or ``post_rope``): U_k is folded into the query.
  Rotated compressed keys cannot be absorbed (rotation depends on each key's position), so they are
  reconstructed; the value side is absorbed regardless. Equal to ``absorb=false`` within fp tolerance;
* ``latent_bits``: latents quantized per token by the quantization family's ``QuantPart``.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary, attention
from kvcompress.cache.lowrank.absorbed import Projection, absorbed_key_scores, gqa_view, latent_attention
from kvcompress.cache.lowrank.calibrate import (
    KEY_MODES,
    ROPE_SELECT,
    PCASettings,
    choose_rank,
    load_or_fit,
    rope_split,
    to_groups,
)
from kvcompress.cache.lowrank.latents import LATENT_DTYPES, Latents
from kvcompress.cache.store import GrowingBuffer

Rank = int | float | str | None


def _check_rank_spec(name: str, r: Rank) -> None:
    ok = r is None or r == "auto" or (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or (
        isinstance(r, float) and 0.0 < r <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be an int >= 1, a fraction in (0, 1], 'auto' or null, got {r!r}")


class LowRankCache(KVCache):
    """Stores a calibrated rank-r latent per token (plus ``rope_dims`` uncompressed rotary dims per head)."""

    def __init__(self, rank: Rank = None, rank_fraction: float | None = 0.5, energy: float = 0.95,
                 key_rank: Rank = None, value_rank: Rank = None, joint_kv: bool = False, per_head: bool = False,
                 rope_dims: int = 0, rope_select: str = "high", nope: bool = False, keys: str = "pre_rope",
                 center: bool = True, absorb: bool = False, latent_dtype: str = "float16",
                 latent_bits: int | None = None, latent_group_size: int | None = None,
                 calibration_file: str | None = None):
        for name, r in (("rank", rank), ("key_rank", key_rank), ("value_rank", value_rank)):
            _check_rank_spec(name, r)
        if rank is None and rank_fraction is None:
            raise ValueError("set rank (an int or 'auto') or rank_fraction (in (0, 1])")
        if rank_fraction is not None and not (isinstance(rank_fraction, (int, float)) and 0 < rank_fraction <= 1):
            raise ValueError(f"rank_fraction must be in (0, 1], got {rank_fraction!r}")
        if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise ValueError(f"energy must be in (0, 1], got {energy!r}")
        if joint_kv and (key_rank is not None or value_rank is not None):
            raise ValueError("key_rank / value_rank apply to separate latents; with joint_kv=true set rank or "
                             "rank_fraction")
        if keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {KEY_MODES}, got {keys!r}")
        if rope_select not in ROPE_SELECT:
            raise ValueError(f"rope_select must be one of {ROPE_SELECT}, got {rope_select!r}")
        if not isinstance(rope_dims, int) or rope_dims < 0 or rope_dims % 2:
            raise ValueError(f"rope_dims must be an even int >= 0 (whole rotary pairs), got {rope_dims!r}")
        if nope and (rope_dims == 0 or keys == "post_rope"):
            raise ValueError("nope=true (leave compressed key dims unrotated) needs rope_dims > 0 and keys=pre_rope")
        if latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {list(LATENT_DTYPES)}, got {latent_dtype!r}")
        if latent_bits not in (None, 8, 4, 2):
            raise ValueError(f"latent_bits must be 8, 4, 2 or null, got {latent_bits!r}")
        if latent_group_size is not None and (not isinstance(latent_group_size, int) or latent_group_size < 1):
            raise ValueError(f"latent_group_size must be an int >= 1 or null, got {latent_group_size!r}")
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
        self.stats: dict[str, float] = {}
        self._seen = torch.zeros((), dtype=torch.long)

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

    def setup(self, spec: ModelSpec) -> None:
        super().setup(spec)
        if self.pca.rope_dims >= spec.head_dim:
            raise ValueError(f"rope_dims={self.pca.rope_dims} must be < head_dim={spec.head_dim} (even, >= 0)")
        for name, (n, what) in self.dims(spec).items():
            r = self.specs[name]
            if isinstance(r, int) and not isinstance(r, bool) and not 1 <= r <= n:
                raise ValueError(f"{self.setting[name]}={r} is outside [1, {n}] for the {name} latent ({what})")
            unit = math.lcm(8 // self.latent_bits, self.latent_group_size or 1) if self.latent_bits else 1
            if n % unit:
                raise ValueError(f"latent_bits={self.latent_bits} with latent_group_size={self.latent_group_size} "
                                 f"needs latent dimensions that are multiples of {unit}; the {name} latent has {n}")

    # -- calibration ---------------------------------------------------------------------------
    def calibrate(self, ctx) -> None:
        log = lambda msg: print(msg, file=sys.stderr, flush=True)
        fitted, self.stats = load_or_fit(ctx, self.pca, self.calibration_file, log)
        if len(fitted) != self.spec.num_layers:
            raise ValueError(f"calibration has {len(fitted)} layers, the model {self.spec.num_layers}")
        self.layers = []
        for layer in fitted:
            projs = {}
            for name, fit in layer.items():
                r = choose_rank(self.specs[name], fit["eig"], self.energy)
                if self.latent_bits is not None:  # whole packed bytes and groups: round the rank up
                    unit = math.lcm(8 // self.latent_bits, self.latent_group_size or 1)
                    r = min(fit["eig"].shape[-1], -(-r // unit) * unit)
                projs[name] = Projection(fit["basis"][..., :r], fit["mean"], self.spec.num_kv_heads)
            self.layers.append(projs)
        self._device = None

    def ranks(self) -> dict[str, list[int]]:
        """Rank of each latent per layer."""
        return {name: [p[name].rank for p in self.layers] for name in self.layers[0]}

    def _prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        if self._device != (device, dtype):
            self.proj = [self._split({n: p.to(device, dtype) for n, p in layer.items()}) for layer in self.layers]
            keep, comp = rope_split(self.spec.head_dim, self.pca.rope_dims, self.pca.rope_select)
            self.keep_idx, self.comp_idx = keep.to(device), comp.to(device)
            self._device = (device, dtype)

    def _split(self, projs: dict[str, Projection]) -> dict[str, Projection]:
        """Add key / value views of a joint projection: rows [:n_k] make key dims, the rest value dims."""
        if "joint" not in projs:
            return projs
        j = projs["joint"]
        n_k = (self.spec.head_dim - self.pca.rope_dims) * j.heads // j.basis.shape[0]
        return {**projs, "key": Projection(j.basis[:, :n_k], j.mean[:, :n_k], j.heads),
                "value": Projection(j.basis[:, n_k:], j.mean[:, n_k:], j.heads)}

    def kv_proj(self, layer: int) -> tuple[Projection, Projection]:
        p = self.proj[layer]
        return p["key"], p["value"]

    # -- token state ---------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        if self.layers is None:
            raise RuntimeError("LowRankCache needs calibrate(ctx) before use")
        self.batch_size = batch_size
        new = lambda r: Latents(r, self.latent_dtype, self.latent_bits, self.latent_group_size)
        self.lat = [{n: new(p.rank) for n, p in layer.items()} for layer in self.layers]
        self.rope_part = [GrowingBuffer() for _ in self.layers]
        self.pos = [GrowingBuffer() for _ in self.layers]
        self._seen = torch.zeros((), dtype=torch.long)
        self.rope: Rotary | None = None
        self._tables: tuple[Tensor, Tensor] | None = None  # cos, sin of the held positions, this step

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        self.rope = rope
        self._prepare(k.device, k.dtype)
        if layer == 0:
            self._tables = None
            self._seen = self._seen.to(pos.device) + (pos < PAD_POSITION).sum()
        rotated = rope.rotate(k, pos) if self.pca.keys == "post_rope" or self.pca.rope_dims else None
        if self.pca.rope_dims:  # uncompressed rotary dims, stored as they are used (rotated once, as MLA's k_pe)
            self.rope_part[layer].append(rotated[..., self.keep_idx].to(LATENT_DTYPES[self.latent_dtype] or k.dtype))
        kc = (rotated if self.pca.keys == "post_rope" else k)[..., self.comp_idx]
        lat, proj = self.lat[layer], self.proj[layer]
        if "joint" in lat:
            G = proj["joint"].basis.shape[0]
            lat["joint"].append(proj["joint"].down(torch.cat([to_groups(kc, G), to_groups(v, G)], -1)))
        else:
            lat["key"].append(proj["key"].encode_heads(kc))
            lat["value"].append(proj["value"].encode_heads(v))
        self.pos[layer].append(pos.to(torch.int32)[:, None])

    # -- attention -----------------------------------------------------------------------------
    def _latents(self, layer: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        lat = self.lat[layer]
        if "joint" in lat:
            c = lat["joint"].read(dtype)
            return c, c
        return lat["key"].read(dtype), lat["value"].read(dtype)

    def _keys_values(self, layer: int, ck: Tensor, cv: Tensor, pos: Tensor, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor | None]:
        """Rotated full keys (B, Hkv, T, D) and, unless absorbing, values, from latents."""
        kp, vp = self.kv_proj(layer)
        kc, v = kp.decode_heads(ck), (None if self.absorb else vp.decode_heads(cv))
        B, H, T, _ = kc.shape
        if not self.pca.rope_dims:
            k = kc
        else:
            k = kc.new_zeros(B, H, T, self.spec.head_dim)
            k[..., self.comp_idx] = kc
        if self.pca.keys == "pre_rope" and not self.nope:
            k = self._rotate(k, pos)  # rope dims are 0 here; rotation keeps pairs, so they stay 0
        if self.pca.rope_dims:
            k[..., self.keep_idx] = self.rope_part[layer].view().to(dtype)
        return k, v

    def _rotate(self, k: Tensor, pos: Tensor) -> Tensor:
        """``rope.rotate(k, pos)`` with cos / sin of the held positions computed once per step, not per layer.

        Every layer holds the same positions, so the tables are taken from one ``rope.rotate`` of a unit
        tensor (first half ones: the result's halves are cos and sin) and dropped at the next append."""
        B, _, T, D = k.shape
        if self._tables is None or self._tables[0].shape[2] != T or self._tables[0].dtype != k.dtype:
            unit = k.new_zeros(B, 1, T, D)
            unit[..., : D // 2] = 1
            r = self.rope.rotate(unit, pos)
            cos, sin = r[..., : D // 2], r[..., D // 2 :]
            self._tables = (torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
        cos, sin = self._tables
        return k * cos + torch.cat([-k[..., D // 2 :], k[..., : D // 2]], -1) * sin

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        pos = self.pos[layer].view()[:, 0]
        ck, cv = self._latents(layer, q.dtype)
        if not self.absorb:
            k, v = self._keys_values(layer, ck, cv, pos, q.dtype)
            return attention(q, k, v, q_pos, pos)
        kp, vp = self.kv_proj(layer)
        H = self.spec.num_kv_heads
        if self.pca.keys == "post_rope" or self.nope:  # fold U_k into the query; rope dims attend as they are
            scores = absorbed_key_scores(q[..., self.comp_idx], ck, kp)
            if self.pca.rope_dims:
                kr = self.rope_part[layer].view().to(q.dtype)
                scores = scores + gqa_view(q[..., self.keep_idx], H) @ kr.transpose(-1, -2)
        else:  # rotated compressed keys: reconstruct them (position-dependent rotation cannot be absorbed)
            k, _ = self._keys_values(layer, ck, cv, pos, q.dtype)
            scores = gqa_view(q, H) @ k.transpose(-1, -2)
        return latent_attention(q, q_pos, pos, cv, vp, scores)

    # -- accounting ----------------------------------------------------------------------------
    def tensors(self) -> Iterable[Tensor]:
        out = [t for layer in self.lat for lat in layer.values() for t in lat.tensors()]
        out += [b.view() for b in self.rope_part + self.pos if b.data is not None]
        return out

    def calibration_tensors(self) -> Iterable[Tensor]:
        if self.layers is None:
            return []
        return [t for layer in self.layers for p in layer.values() for t in (p.basis, p.mean)]

    @property
    def tokens_seen(self) -> int:
        return int(self._seen)

    def memory_report(self) -> dict[str, float]:
        report = super().memory_report()
        for name, ranks in self.ranks().items():
            report[f"{name}_rank_mean"] = sum(ranks) / len(ranks)
        return {**report, **self.stats}
