"""MiniCache-style merging: from ``start_layer`` on, adjacent layer pairs store one merged direction.

For a pair (a, a+1) and every token and KV head, keys and values are split into a magnitude
(vector norm) and a direction. The two layers' directions are merged by SLERP at ``t``; each layer
keeps its own magnitude, and reconstructs ``direction x its magnitude``. A token whose directions
disagree too much (angle >= ``threshold`` radians, for any head, keys or values) is *retained*:
stored unmerged for both layers. ``threshold=0`` retains everything (the full cache);
``threshold=pi`` merges everything.

Timing: each layer attends its own new tokens exactly; the pair is merged once the second layer
has attended, so every later step (and every later chunk) sees the merged representation.
Bookkeeping is per batch row: rows merge different tokens, padded to the step's longest row with
invisible (``PAD_POSITION``) slots. The merged directions and the retained tokens live in stores of
any ``storage``; magnitudes are ``magnitude_dtype`` (fp16). Reported bytes are those tensors.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, ModelSpec
from kvcompress.cache.layered import KeyMode, LayeredCache
from kvcompress.cache.store import GrowingBuffer, TokenStore, gather_tokens

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def polar(x: Tensor) -> tuple[Tensor, Tensor]:
    """Unit directions and norms (last dim) of x (B, H, T, D), in float32."""
    x = x.float()
    norm = x.norm(dim=-1)
    return x / norm.clamp_min(1e-12)[..., None], norm


def slerp(u: Tensor, w: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Spherical interpolation of unit vectors at ``t`` and their angle (radians)."""
    angle = (u * w).sum(-1).clamp(-1.0, 1.0).acos()
    sin = angle.sin()[..., None]
    a, tiny = angle[..., None], sin.abs() < 1e-6  # (nearly) parallel: the directions are already equal
    wu = torch.where(tiny, 1.0 - t, ((1 - t) * a).sin() / sin.where(~tiny, 1.0))
    ww = torch.where(tiny, t, (t * a).sin() / sin.where(~tiny, 1.0))
    merged = wu * u + ww * w
    return merged / merged.norm(dim=-1, keepdim=True).clamp_min(1e-12), angle


def pick(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, indices of the tokens where ``mask`` (B, T) holds, padded to the longest row; and validity."""
    count = int(mask.sum(1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]
    return order, torch.gather(mask, 1, order)


class MergedPair:
    """The shared storage of one layer pair: merged directions, magnitudes, each side's retained tokens."""

    def __init__(self, new_store, t: float, threshold: float, magnitude_dtype: torch.dtype):
        self.merged, self.own = new_store(), (new_store(), new_store())
        self.magnitudes = GrowingBuffer()  # (B, Hkv, T, 4): |k_a|, |k_b|, |v_a|, |v_b|
        self.t, self.threshold, self.magnitude_dtype = t, threshold, magnitude_dtype
        self.pending: list[tuple[Tensor, Tensor, Tensor] | None] = [None, None]
        self.merged_tokens = self.pair_tokens = 0

    def read(self, side: int) -> tuple[Tensor, Tensor, Tensor]:
        """History of one side (its retained tokens and the merged ones) plus its pending tokens."""
        k_new, v_new, p_new = self.pending[side]
        ks, vs, ps = [k_new], [v_new], [p_new.to(torch.int32)]
        if self.own[side].length:
            k, v, p = self.own[side].read()
            ks.append(k), vs.append(v), ps.append(p)
        if self.merged.length:
            k, v, p = self.merged.read()
            mag = self.magnitudes.view()
            ks.append(k * mag[..., side, None]), vs.append(v * mag[..., 2 + side, None]), ps.append(p)
        dtype = k_new.dtype
        return torch.cat([k.to(dtype) for k in ks], 2), torch.cat([v.to(dtype) for v in vs], 2), torch.cat(ps, 1)

    def merge(self) -> None:
        """Store both sides' pending tokens: merged where their directions agree, retained otherwise."""
        (ka, va, pos), (kb, vb, _) = self.pending
        self.pending = [None, None]
        (uka, nka), (ukb, nkb) = polar(ka), polar(kb)
        (uva, nva), (uvb, nvb) = polar(va), polar(vb)
        k_dir, k_angle = slerp(uka, ukb, self.t)
        v_dir, v_angle = slerp(uva, uvb, self.t)
        real = pos < PAD_POSITION
        retain = real & (torch.maximum(k_angle, v_angle).amax(1) >= self.threshold)  # (B, T)
        merge = real & ~retain
        self.merged_tokens += int(merge.sum())
        self.pair_tokens += int(real.sum())
        mags = torch.stack([nka, nkb, nva, nvb], -1)
        self._store(self.merged, merge, pos, k_dir.to(ka.dtype), v_dir.to(va.dtype), mags)
        self._store(self.own[0], retain, pos, ka, va)
        self._store(self.own[1], retain, pos, kb, vb)

    def _store(self, store: TokenStore, mask: Tensor, pos: Tensor, k: Tensor, v: Tensor,
               mags: Tensor | None = None) -> None:
        idx, valid = pick(mask)
        if idx.shape[1] == 0:
            return
        keep = valid[:, None, :, None]
        store.append(gather_tokens(k, idx) * keep, gather_tokens(v, idx) * keep,
                     torch.where(valid, torch.gather(pos, 1, idx), PAD_POSITION))
        if mags is not None:
            self.magnitudes.append((gather_tokens(mags, idx) * keep).to(self.magnitude_dtype))

    def tensors(self) -> list[Tensor]:
        mags = [self.magnitudes.view()] if self.magnitudes.data is not None else []
        return self.merged.tensors() + mags + self.own[0].tensors() + self.own[1].tensors()


class PairSide(TokenStore):
    """One layer's view of its pair: appends are staged until the pair merges."""

    def __init__(self, pair: MergedPair, side: int):
        self.pair, self.side = pair, side

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.pair.pending[self.side] = (k, v, pos)

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.pair.read(self.side)

    def keep(self, idx: Tensor) -> None:
        raise NotImplementedError("MiniCache pairs do not support eviction")

    def tensors(self) -> list[Tensor]:  # the pair's tensors are counted once, with its first layer
        return self.pair.tensors() if self.side == 0 else []

    @property
    def length(self) -> int:
        return self.pair.merged.length + self.pair.own[self.side].length

    def positions(self) -> Tensor:
        held = [s.positions() for s in (self.pair.own[self.side], self.pair.merged) if s.length]
        return torch.cat(held, 1) if held else torch.empty(0, 0, dtype=torch.int32)


class MiniCache(LayeredCache):
    def __init__(self, start_layer: int = 15, threshold: float = 1.8, t: float = 0.5, magnitude_dtype: str = "float16",
                 storage: str = "dense", storage_params: dict | None = None, keys: KeyMode = "post_rope"):
        super().__init__(storage, storage_params, keys)
        if isinstance(start_layer, bool) or not isinstance(start_layer, int) or start_layer < 0:
            raise ValueError(f"start_layer must be an int >= 0, got {start_layer!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= math.pi:
            raise ValueError(f"threshold must be an angle in [0, pi] radians, got {threshold!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f"t (the SLERP interpolation weight) must be in [0, 1], got {t!r}")
        if magnitude_dtype not in DTYPES:
            raise ValueError(f"unknown magnitude_dtype {magnitude_dtype!r}; valid choices: {', '.join(DTYPES)}")
        self.start_layer, self.threshold, self.t = start_layer, float(threshold), float(t)
        self.magnitude_dtype = DTYPES[magnitude_dtype]

    def setup(self, spec: ModelSpec) -> None:
        super().setup(spec)
        if self.start_layer > spec.num_layers - 2:
            raise ValueError(f"start_layer must be in [0, num_layers - 2 = {spec.num_layers - 2}] "
                             f"so that at least one pair is merged, got {self.start_layer}")

    def pairs(self) -> list[tuple[int, int]]:
        return [(a, a + 1) for a in range(self.start_layer, self.spec.num_layers - 1, 2)]

    def reset(self, batch_size: int) -> None:
        super().reset(batch_size)
        self.merged_pairs: dict[int, MergedPair] = {}
        for a, b in self.pairs():
            pair = MergedPair(self.new_store, self.t, self.threshold, self.magnitude_dtype)
            self.stores[a], self.stores[b] = PairSide(pair, 0), PairSide(pair, 1)
            self.merged_pairs[b] = pair

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        out = super().attend(layer, q, q_pos)
        if layer in self.merged_pairs:  # both sides have attended: store the step merged
            self.merged_pairs[layer].merge()
        return out

    def memory_report(self) -> dict[str, float]:
        merged = sum(p.merged_tokens for p in self.merged_pairs.values())
        total = sum(p.pair_tokens for p in self.merged_pairs.values())
        return {**super().memory_report(), "merged_fraction": merged / total if total else 0.0}
