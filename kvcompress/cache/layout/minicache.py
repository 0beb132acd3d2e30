"""MiniCache-style merging (Liu et al., 2024): from ``start_layer`` on, adjacent layer pairs store one merged
direction per token and KV head.

For a pair (a, a+1), keys and values are split into a magnitude (vector norm) and a direction. The two
layers' directions are merged by SLERP at ``t``: merge(u, w) = sin((1-t)θ)/sin θ · u + sin(tθ)/sin θ · w,
θ = angle(u, w); each layer keeps its own magnitude and reconstructs ``direction x its magnitude``.
A token whose directions disagree too much (θ >= ``threshold`` radians, for any head, K or V) is
*retained*: stored unmerged for both layers. ``threshold=0`` retains everything: no pair is built, the
per-layer layout exactly (bit for bit, whatever the storage);
``threshold=pi`` merges everything. Keys are merged before RoPE: both layers rotate a token by the same
angle, so angles, norms and SLERP commute with the rotation.

Timing: each layer attends its own new tokens exactly; the pair merges once the second layer has
attended, so every later step sees the merged representation. A layer's view of its pair is, in slot
order, [its retained tokens; the merged tokens; its own new tokens]; both sides have the same slots,
so a policy scores the pair with both layers' attention and ``keep`` acts on the whole pair. Rows (and
heads) merge or keep different tokens; slots are padded to the fullest row with invisible positions.
Merged directions and retained tokens live in stores of any storage; magnitudes are ``magnitude_dtype``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, ModelSpec, Rotary
from kvcompress.cache.buffers import GrowingBuffer, gather_tokens, pick_rows
from kvcompress.cache.checks import dtype_of, int_at_least, number_in
from kvcompress.cache.layout.base import Layout, NewStore
from kvcompress.cache.storage.base import TokenStore


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


def positions_like(parts: list[Tensor]) -> Tensor:
    """Concatenate (B, T) and (B, H, T) positions along tokens (per head once any part is)."""
    heads = max((p.shape[1] for p in parts if p.dim() == 3), default=0)
    if heads:
        parts = [p if p.dim() == 3 else p[:, None].expand(-1, heads, -1) for p in parts]
    return torch.cat(parts, -1)


class MergedPair:
    """The storage of one layer pair: merged directions, their magnitudes, each side's retained tokens."""

    def __init__(self, first: int, new_store: NewStore, t: float, threshold: float, magnitude_dtype: torch.dtype):
        self.merged, self.own = new_store(first), (new_store(first), new_store(first + 1))
        self.magnitudes = GrowingBuffer()  # (B, Hkv or 1, T, 4): |k_a|, |k_b|, |v_a|, |v_b|
        self.t, self.threshold, self.magnitude_dtype = t, threshold, magnitude_dtype
        self.pending: list[tuple[Tensor, Tensor, Tensor] | None] = [None, None]
        self.rope: Rotary | None = None
        self.merged_tokens = self.pair_tokens = 0
        self.kept_from: list[tuple[tuple[TokenStore, ...], Tensor, Tensor]] = []  # the last keep's parts (``hide``)

    @property
    def held(self) -> int:
        return self.own[0].length + self.merged.length

    def read(self, side: int) -> tuple[Tensor, Tensor, Tensor]:
        """One side's view: its retained tokens, the merged ones at its magnitudes, its pending tokens."""
        ks, vs, ps = [], [], []
        if self.own[side].length:
            k, v, p = self.own[side].read()
            ks.append(k), vs.append(v), ps.append(p)
        if self.merged.length:
            k, v, p = self.merged.read()
            mag = self.magnitudes.view().to(k.dtype)
            ks.append(k * mag[..., side, None]), vs.append(v * mag[..., 2 + side, None]), ps.append(p)
        if self.pending[side] is not None:
            k, v, p = self.pending[side]
            ks.append(self.rope.rotate(k, p)), vs.append(v), ps.append(p.to(torch.int32))
        dtype = vs[-1].dtype
        heads = max(k.shape[1] for k in ks)
        ks = [k.to(dtype).expand(-1, heads, -1, -1) for k in ks]
        vs = [v.to(dtype).expand(-1, heads, -1, -1) for v in vs]
        return torch.cat(ks, 2), torch.cat(vs, 2), positions_like(ps)

    def merge(self) -> Tensor:
        """Store both sides' pending tokens, merged where their directions agree, retained otherwise.
        Returns the slot map new -> old of the pair's view (for policy state)."""
        (ka, va, pos), (kb, vb, _) = self.pending
        self.pending = [None, None]
        n_own, n_merged = self.own[0].length, self.merged.length
        (uka, nka), (ukb, nkb) = polar(ka), polar(kb)
        (uva, nva), (uvb, nvb) = polar(va), polar(vb)
        k_dir, k_angle = slerp(uka, ukb, self.t)
        v_dir, v_angle = slerp(uva, uvb, self.t)
        real = pos < PAD_POSITION
        retain = real & (torch.maximum(k_angle, v_angle).amax(1) >= self.threshold)  # (B, T)
        merge = real & ~retain
        self.merged_tokens += int(merge.sum())
        self.pair_tokens += int(real.sum())
        kept = self._store(self.own[0], retain, pos, ka, va)
        self._store(self.own[1], retain, pos, kb, vb)
        merged = self._store(self.merged, merge, pos, k_dir.to(ka.dtype), v_dir.to(va.dtype),
                             torch.stack([nka, nkb, nva, nvb], -1))
        B, dev = pos.shape[0], pos.device
        base = n_own + n_merged  # pending slots start here in the old view
        return torch.cat([torch.arange(n_own, device=dev).expand(B, -1), base + kept,
                          torch.arange(n_own, base, device=dev).expand(B, -1), base + merged], 1)

    def _store(self, store: TokenStore, mask: Tensor, pos: Tensor, k: Tensor, v: Tensor,
               mags: Tensor | None = None) -> Tensor:
        idx, valid = pick_rows(mask)
        if idx.shape[1]:
            live = valid[:, None, :, None]
            store.append(gather_tokens(k, idx) * live, gather_tokens(v, idx) * live,
                         torch.where(valid, torch.gather(pos, 1, idx), PAD_POSITION), self.rope)
            if mags is not None:
                self.magnitudes.append((gather_tokens(mags, idx) * live).to(self.magnitude_dtype))
        return idx

    def keep(self, idx: Tensor) -> None:
        """Keep slots ``idx`` (B, K) or (B, Hkv, K) of the view; the pending tokens (the last slots) must stay."""
        n_own = self.own[0].length
        n_pending = idx.shape[-1] - int((idx < self.held).sum(-1).max())
        core = idx[..., : idx.shape[-1] - n_pending]
        self.kept_from = []  # per part: which entries of idx its new slots hold
        for part, in_part, offset in ((self.own, core < n_own, 0), ((self.merged,), core >= n_own, n_own)):
            if not part[0].length:
                continue
            order, valid = pick_rows(in_part)
            self.kept_from.append((part, order, valid))
            sel = (torch.gather(core, -1, order) - offset).clamp_min(0).masked_fill(~valid, 0)
            for store in part:
                store.keep(sel)
                store.hide(valid)
            if part[0] is self.merged:
                self.magnitudes.replace(gather_tokens(self.magnitudes.view(), sel))

    def hide(self, valid: Tensor) -> None:
        """After ``keep(idx)``: hide the new slots that hold entries of ``idx`` where ``valid`` (the shape of idx) is
        False (rows kept to different counts). The pair's new view is its own part then its merged part, not idx's
        order, so each part's slots are mapped back to the entries they came from."""
        for part, order, held in self.kept_from:
            for store in part:
                store.hide(torch.gather(valid, -1, order) & held)

    def tensors(self, reserved: bool = False) -> list[Tensor]:
        of = (lambda s: s.reserved_tensors()) if reserved else (lambda s: s.tensors())
        mags = self.magnitudes.reserved() if reserved else self.magnitudes.tensors()
        return of(self.merged) + mags + of(self.own[0]) + of(self.own[1])


class PairSide(TokenStore):
    """One layer's view of its pair: appends are staged until the pair merges; ``keep`` keeps the pair's slots."""

    def __init__(self, pair: MergedPair, side: int):
        self.pair, self.side, self.keys = pair, side, pair.merged.keys

    @property
    def ragged_heads(self) -> bool:
        return self.pair.merged.ragged_heads

    def append(self, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        self.pair.rope, self.pair.pending[self.side] = rope, (k, v, pos)

    def read(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.pair.read(self.side)

    def keep(self, idx: Tensor) -> None:
        self.pair.keep(idx)

    def hide(self, valid: Tensor) -> None:
        self.pair.hide(valid)

    # a merged direction is shared by both layers, and keep re-packs the pair's parts: no per-side value rewrite
    # (CaM) and no padded per-head counts (AdaKV, DuoAttention)
    values_writable = pads_heads = False

    def positions(self) -> Tensor:
        return self.read()[2] if self.pair.pending[self.side] is not None or self.pair.held else torch.empty(0, 0)

    @property
    def length(self) -> int:
        pending = self.pair.pending[self.side]
        return self.pair.held + (pending[2].shape[1] if pending is not None else 0)

    def tensors(self) -> list[Tensor]:  # the pair is counted once, with its first layer
        return self.pair.tensors() if self.side == 0 else []

    def reserved_tensors(self) -> list[Tensor]:
        return self.pair.tensors(reserved=True) if self.side == 0 else []

    # the payload hooks are never used: the pair's stores hold the tokens
    clear_payload = append_payload = read_payload = keep_payload = payload_tensors = None


class MiniCache(Layout):
    def __init__(self, start_layer: int = 15, threshold: float = 1.8, t: float = 0.5,
                 magnitude_dtype: str = "float16"):
        self.start_layer = int_at_least("layout.start_layer", start_layer, 0)
        self.threshold = number_in("layout.threshold (the retention angle in radians)", threshold, 0, math.pi)
        self.t = number_in("layout.t (the SLERP interpolation weight)", t, 0, 1)
        self.magnitude_dtype = dtype_of("layout.magnitude_dtype", magnitude_dtype)
        if self.magnitude_dtype is None:
            raise ValueError("layout.magnitude_dtype must be float16, bfloat16 or float32, got 'model'")

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        if self.start_layer > spec.num_layers - 2:
            raise ValueError(f"layout.start_layer must be in [0, num_layers - 2 = {spec.num_layers - 2}] "
                             f"so that at least one pair is merged, got {self.start_layer}")

    def pairs(self) -> list[tuple[int, int]]:
        if self.threshold == 0:  # every angle is >= 0: every token would be retained, nothing merges
            return []
        return [(a, a + 1) for a in range(self.start_layer, self.spec.num_layers - 1, 2)]

    def owners(self) -> list[int]:
        owner = list(range(self.spec.num_layers))
        for a, b in self.pairs():
            owner[b] = a
        return owner

    def build(self, new_store: NewStore) -> list[TokenStore]:
        views: list[TokenStore] = [new_store(layer) for layer in range(self.spec.num_layers)]
        self.merged_pairs: dict[int, MergedPair] = {}
        for a, b in self.pairs():
            pair = MergedPair(a, new_store, self.t, self.threshold, self.magnitude_dtype)
            views[a], views[b] = PairSide(pair, 0), PairSide(pair, 1)
            self.merged_pairs[b] = pair
        return views

    def after_attend(self, layer: int) -> Tensor | None:
        pair = self.merged_pairs.get(layer)
        return pair.merge() if pair is not None and pair.pending[0] is not None else None

    def report(self) -> dict[str, float | str]:
        merged = sum(p.merged_tokens for p in self.merged_pairs.values())
        total = sum(p.pair_tokens for p in self.merged_pairs.values())
        return {"merged_fraction": merged / total if total else 0.0}
