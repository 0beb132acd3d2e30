"""Rotary position embedding (rotate-half convention) with Llama-3, linear and dynamic-NTK scaling."""
from __future__ import annotations

import math

import torch
from torch import Tensor

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def _inv_freq(dim: int, base: float) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _llama3(inv_freq: Tensor, s: dict) -> Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """Rotates (B, H, T, D) tensors at arbitrary absolute positions.

    Caches receive this object with every append, so a strategy may store keys unrotated and
    rotate them later at their stored positions.
    """

    def __init__(self, head_dim: int, base: float, scaling: dict | None, max_position: int):
        self.head_dim, self.base = head_dim, base
        self.scaling = dict(scaling or {})
        self.kind = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if self.kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {self.kind!r}; supported: {', '.join(ROPE_TYPES)}")
        self.original_max = self.scaling.get("original_max_position_embeddings", max_position)
        self.inv_freq = _inv_freq(head_dim, base)
        if self.kind == "linear":
            self.inv_freq = self.inv_freq / self.scaling["factor"]
        elif self.kind == "llama3":
            self.inv_freq = _llama3(self.inv_freq, self.scaling)
        self._dynamic_len = self.original_max
        self._pos: Tensor | None = None  # this forward's positions, and their cos/sin per dtype
        self._memo: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def prepare(self, pos: Tensor) -> None:
        """Called once per forward with its positions: every layer rotates its queries and new keys at them, so
        their cos/sin are computed once (per dtype) until the next call. Refreshed every forward, so a positions
        buffer reused with new values (a captured step's) is never served stale. Dynamic NTK grows its base as HF
        does."""
        self._pos, self._memo = pos, {}
        if self.kind != "dynamic":
            return
        seq_len = int(pos.max()) + 1
        if seq_len > self._dynamic_len or (seq_len < self.original_max < self._dynamic_len):
            length = max(seq_len, self.original_max)
            factor, d = self.scaling["factor"], self.head_dim
            base = self.base * ((factor * length / self.original_max) - (factor - 1)) ** (d / (d - 2))
            self.inv_freq = _inv_freq(d, base)
            self._dynamic_len = length

    def cos_sin(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape pos.shape + (D,), computed in fp32 then cast (as transformers does)."""
        this_forward = pos is self._pos
        if this_forward and dtype in self._memo:
            return self._memo[dtype]
        if self.inv_freq.device != pos.device:  # once per device (and per dynamic-NTK rebase), not per forward
            self.inv_freq = self.inv_freq.to(pos.device)
        freqs = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        out = emb.cos().to(dtype), emb.sin().to(dtype)
        if this_forward:
            self._memo[dtype] = out
        return out

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        cos, sin = self.cos_sin(pos, x.dtype)
        if pos.dim() == 2:  # (B, T) -> broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
