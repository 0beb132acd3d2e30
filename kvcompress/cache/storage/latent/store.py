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
* ``latent_bits``: latents quantized per token (``kernels.quantize_tokens``: group-wise codes, fp16 scale and zero).

A codec (``storage.codec``): a token's parts are its latents (``key`` and ``value``, or ``joint``; with ``latent_bits``
their codes, scales and zeros) and, with ``rope_dims``, its rotated uncompressed dims (``rope``). Eagerly they grow
with the tokens; the captured form is the same codec in fixed slots (``FixedSlotCache``), under a fixed-budget
eviction policy too (each layer encodes with its own projections).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec, attention
from kvcompress.cache.checks import DTYPES, is_int, number_in, one_of
from kvcompress.cache.storage.base import TokenStore
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.fixed import FixedSlotCache
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
from kvcompress.kernels import Packed, quantize_tokens, resolve
from kvcompress.kernels import latent_attention as latent_attention_kernel
from kvcompress.kernels.reference import dequant_prefix

Rank = int | float | str | None


def _check_rank_spec(name: str, r: Rank) -> None:
    if not (r is None or r == "auto" or (is_int(r) and r >= 1) or (isinstance(r, float) and 0.0 < r <= 1.0)):
        raise ValueError(f"storage.{name} must be an int >= 1, a fraction in (0, 1], 'auto' or null, got {r!r}")


class LatentStore(CodecStore):
    """Stores a calibrated rank-r latent per token (plus ``rope_dims`` uncompressed rotary dims per head)."""

    values_writable = False  # values live in a (possibly joint) latent: no ``update_values`` (CaM)

    def __init__(self, rank: Rank = None, rank_fraction: float | None = 0.5, energy: float = 0.95,
                 key_rank: Rank = None, value_rank: Rank = None, joint_kv: bool = False, per_head: bool = False,
                 rope_dims: int = 0, rope_select: str = "high", nope: bool = False, keys: str = "pre_rope",
                 center: bool = True, absorb: bool = False, latent_dtype: str = "float16",
                 latent_bits: int | None = None, latent_group_size: int | None = None,
                 calibration_file: str | None = None, backend: str | None = None):
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
        self.backend = backend  # kernels' backend (None: ``KVC_KERNELS`` / auto)
        super().__init__(keys)

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
            if is_int(r) and not 1 <= r <= n:
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

    def ranks(self) -> dict[str, list[int]]:
        return {name: [p[name].rank for p in self.layers] for name in self.layers[0]}

    def _prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """This layer's projections on ``device`` in ``dtype``, once per (device, dtype)."""
        if self.layers is None:
            raise RuntimeError("storage=latent needs calibrate(ctx) before use")
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

    # -- the codec ---------------------------------------------------------------------------------
    def clear_payload(self) -> None:
        super().clear_payload()
        self._device = None  # a fresh per-layer store prepares its own layer's projections

    def encode(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """Keys as stored (rotated under ``keys=post_rope``): the latents of the compressed dims and values (in the
        projections' dtype, then held: cast to ``latent_dtype`` or quantized) and the kept rotary dims as they are."""
        self._prepare(k.device, k.dtype)
        kc = k[..., self.comp_idx]
        if self.pca.joint_kv:
            G = self.proj["joint"].basis.shape[0]
            latents = {"joint": self.proj["joint"].down(torch.cat([to_groups(kc, G), to_groups(v, G)], -1))}
        else:
            latents = {"key": self.proj["key"].encode_heads(kc), "value": self.proj["value"].encode_heads(v)}
        held = {}
        for name, c in latents.items():
            c = c.to(DTYPES[self.latent_dtype] or c.dtype)
            if self.latent_bits is None:
                held[name] = c
            else:
                held[name], held[f"{name}_scale"], held[f"{name}_zero"] = quantize_tokens(
                    c, self.latent_bits, self.latent_group_size or c.shape[-1], False, self.backend)
        if self.pca.rope_dims:
            held["rope"] = k[..., self.keep_idx].to(DTYPES[self.latent_dtype] or k.dtype)
        return held

    def encode_at(self, k: Tensor, v: Tensor, pos: Tensor) -> dict[str, Tensor]:
        """Pre-RoPE keys keep their ``rope_dims`` rotated (decoupled RoPE): rotated once, on arrival, at ``pos``."""
        parts = self.encode(k, v)
        if self.pca.rope_dims and self.keys == "pre_rope":
            parts["rope"] = self.rope.rotate(k, pos)[..., self.keep_idx].to(parts["rope"].dtype)
        return parts

    def packed(self, parts: dict[str, Tensor], name: str) -> Tensor | Packed:
        """One latent as held: a dense tensor, or its codes as a kernel side."""
        if self.latent_bits is None:
            return parts[name]
        return Packed(parts[name], parts[f"{name}_scale"], parts[f"{name}_zero"], None, self.latent_bits,
                      self.latent_group_size or self.proj[name].rank, "token")

    def latents(self, parts: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Key and value latents (the joint one twice) in ``dtype``."""
        out = []
        for name in ("joint", "joint") if self.pca.joint_kv else ("key", "value"):
            c = self.packed(parts, name)
            out.append(c.to(dtype) if isinstance(c, Tensor) else dequant_prefix(c, 0, c.codes.shape[2]).to(dtype))
        return out[0], out[1]

    def decode(self, parts: dict[str, Tensor], dtype) -> tuple[Tensor, Tensor]:
        """Keys as stored (pre-RoPE ones unrotated but for their rotated ``rope_dims``) and values."""
        return self.decode_at(parts, dtype, None)

    def decode_at(self, parts: dict[str, Tensor], dtype, pos: Tensor | None) -> tuple[Tensor, Tensor]:
        """Rotated keys and values (B, Hkv, T, D) in ``dtype`` at key positions ``pos`` (None: keys as stored)."""
        ck, cv = self.latents(parts, dtype)
        return self.keys_from(ck, parts.get("rope"), pos), self.proj["value"].decode_heads(cv)

    def keys_from(self, ck: Tensor, rope_part: Tensor | None, pos: Tensor | None) -> Tensor:
        """Full keys from key latents (compressed dims; rotated at ``pos`` unless ``nope`` or stored rotated) and the
        uncompressed rotary dims."""
        kc = self.proj["key"].decode_heads(ck)
        if not self.pca.rope_dims:
            k = kc
        else:
            k = kc.new_zeros(*kc.shape[:3], self.spec.head_dim)
            k[..., self.comp_idx] = kc
        if pos is not None and self.keys == "pre_rope" and not self.nope:
            k = self.rope.rotate(k, pos)  # rope dims are 0 here; rotation keeps pairs, so they stay 0
        if rope_part is not None:
            k[..., self.keep_idx] = rope_part.to(ck.dtype)
        return k

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        pos = self.positions()
        return *self.decode_at(self.parts.view(), self.dtype, pos), pos

    # -- attention ---------------------------------------------------------------------------------
    def attend(self, q: Tensor, q_pos: Tensor, n_weights: int = 0) -> tuple[Tensor, Tensor | None]:
        """Reconstructed keys and values (``TokenStore.attend``), or with ``absorb`` in latent space (one fused kernel
        where ``fused`` and no weights are wanted), whose softmax weights are the policy's."""
        if not self.absorb:
            return TokenStore.attend(self, q, q_pos, n_weights)
        pos, parts = self.positions(), self.parts.view()
        if n_weights <= 0:
            return self.attend_packed(q, q_pos, pos, parts), None
        out, p = self.absorbed_attention(q, q_pos, pos, parts)  # the weights: never fused
        return out, p[:, :, -n_weights:]

    def attend_packed(self, q: Tensor, q_pos: Tensor, k_pos: Tensor, parts: dict[str, Tensor],
                      lengths: Tensor | None = None) -> Tensor:
        """The captured form's attention over every slot (empty ones at ``PAD_POSITION``), as ``attend`` computes it."""
        if not self.absorb:
            k, v = self.decode_at(parts, q.dtype, k_pos)
            return attention(q, k, v, q_pos, k_pos)
        if self.fused():
            return self.fused_attention(q, q_pos, k_pos, parts, lengths)
        return self.absorbed_attention(q, q_pos, k_pos, parts)[0]

    def decodes_for_attention(self, q: Tensor) -> bool:
        return False  # ``attend_packed`` computes what ``attend`` does, prefill chunks included

    def fused(self) -> bool:
        """Absorbed attention in one kernel (no weights): keys not rotated after reconstruction, no rope dims."""
        return self.absorb and self.keys == "post_rope" and not self.pca.rope_dims

    def fused_attention(self, q: Tensor, q_pos: Tensor, pos: Tensor, parts: dict[str, Tensor],
                        lengths: Tensor | None = None) -> Tensor:
        """U_k folded into the query, P applied to the stored (maybe quantized) latents, one up-projection
        (``kernels.latent_attention``). ``lengths``: the slots written, for Triton to read on the device."""
        ck, cv = (self.packed(parts, n) for n in (("joint", "joint") if self.pca.joint_kv else ("key", "value")))
        ck, cv = (c.to(q.dtype) if isinstance(c, Tensor) else c for c in (ck, cv))
        if lengths is not None and resolve(q.device, self.backend) == "triton":  # [n_q of K, n_q of V, T]
            n = lengths.view(1).to(torch.int32)
            lengths = torch.cat([n, n, n] if self.latent_bits else [n.new_zeros(2), n])
        else:
            lengths = None
        kp, vp = self.proj["key"], self.proj["value"]
        return latent_attention_kernel(q, q_pos, pos, ck, cv, kp.head_basis(), vp.head_basis(), vp.head_mean(),
                                       backend=self.backend, lengths=lengths)

    def absorbed_attention(self, q: Tensor, q_pos: Tensor, pos: Tensor, parts: dict[str, Tensor]
                           ) -> tuple[Tensor, Tensor]:
        """Attention in latent space over latents read in q's dtype: the output and the softmax weights."""
        ck, cv = self.latents(parts, q.dtype)
        rope_part, kp, H = parts.get("rope"), self.proj["key"], self.spec.num_kv_heads
        if self.keys == "post_rope" or self.nope:  # fold U_k into the query; rope dims attend as they are
            scores = absorbed_key_scores(q[..., self.comp_idx], ck, kp)
            if rope_part is not None:
                scores = scores + gqa_view(q[..., self.keep_idx], H) @ rope_part.to(q.dtype).transpose(-1, -2)
        else:  # rotated compressed keys: reconstructed (position-dependent rotation cannot be absorbed)
            scores = gqa_view(q, H) @ self.keys_from(ck, rope_part, pos).transpose(-1, -2)
        return latent_attention(q, q_pos, pos, cv, self.proj["value"], scores)

    # -- forms and figures -------------------------------------------------------------------------
    def static_form(self, capacity: int):
        """This codec in fixed slots (every setting, ``latent_bits`` included), sharing the calibrated projections."""
        return FixedSlotCache(self, capacity)

    def calibration_tensors(self) -> list[Tensor]:
        unique = {id(p): p for layer in self.layers or [] for p in layer.values()}.values()
        return [t for p in unique for t in (p.basis, p.mean)]

    def report(self) -> dict[str, float | str]:
        out = {f"{name}_rank_mean": sum(r) / len(r) for name, r in self.ranks().items()} if self.layers else {}
        return {**out, **self.stats}
