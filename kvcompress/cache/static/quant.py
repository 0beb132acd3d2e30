"""Quantized K/V in static-capacity buffers: the quantized storage's codes (int8/int4/int2 and KIVI), captured.

Each of K and V is a ``StaticPart``: packed codes and fp16 scales (and zeros) for ``capacity`` tokens, and a
full-precision residual of ``residual + gran`` slots (``gran`` = 1 for per-token groups, ``group_size`` for
per-channel groups). After ``n`` tokens the quantized prefix holds ``split(n) = floor(max(n - residual, 0) /
gran) * gran`` tokens and the residual the other ``n - split(n)``: the storage's own rule
(``storage.quant.part``), so the codes are bit for bit the eager storage's.

A single-token step is branch-free on the device: the token goes to residual slot ``n - 1 - split(n - 1)``;
the first ``gran`` residual tokens are quantized every step and written at prefix slot ``split(n - 1)`` only
where ``flush = split(n) > split(n - 1)`` (``torch.where`` against what is there), and the residual shifts left
by ``gran`` under the same flag. These counts are computed once per step (``StaticPart.count``, at layer 0) and
serve every layer. Longer steps (prefill chunks, never captured) read the counts on the host.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.cache.base import ModelSpec
from kvcompress.cache.storage.fixed import FixedSlotCache
from kvcompress.cache.storage.quant.part import prefix_length
from kvcompress.cache.storage.quant.quantizer import QuantConfig, quantize
from kvcompress.kernels import Packed, dense, quant_attention, quantize_tokens, resolve
from kvcompress.kernels.reference import dequant_prefix


class StaticPart:
    """One of K or V for every layer: codes (L, B, H, Cq, D * bits / 8), scale/zero (L, B, H, Cq, D / g) per token
    or (L, B, H, Cq / g, D) per channel, residual (L, B, H, residual + gran, D); ``Cq`` = capacity rounded up to
    whole groups."""

    def __init__(self, cfg: QuantConfig, residual: int, backend: str | None = None):
        self.cfg, self.residual, self.backend = cfg, residual, backend
        self.gran = cfg.token_granularity
        self.direct = residual == 0 and self.gran == 1  # every token quantized on arrival: no residual buffer
        self.codes = self.scale = self.zero = self.res = None

    def split(self, n):
        """Tokens of ``n`` in the quantized prefix (an int or a device tensor): the storage's rule."""
        return prefix_length(n, self.residual, self.gran)

    def count(self, n: Tensor, T: int) -> None:
        """The step's counts, once for every layer: ``n`` (0-d, device) tokens after a step of T. A single-token
        step keeps them on the device (where the token goes, whether a group is flushed, and where to); a
        multi-token step reads n on the host."""
        self.n_q = self.split(n)
        if T > 1:
            self.n_host = int(n)
            return
        q_old = self.split(n - 1)
        self.flush = self.n_q > q_old
        self.res_slot = (n - 1 - q_old).view(1)
        self.at = q_old + torch.arange(self.gran, device=n.device)  # q_old < capacity, whole groups: in range

    def allocate(self, lead: tuple[int, ...], capacity: int, D: int, res_dtype: torch.dtype, device) -> None:
        cfg = self.cfg
        slots = math.ceil(capacity / self.gran) * self.gran
        rows = (slots, D // cfg.group_size) if cfg.axis == "token" else (slots // cfg.group_size, D)
        self.codes = torch.zeros((*lead, slots, D * cfg.bits // 8), dtype=torch.uint8, device=device)
        self.scale = torch.zeros((*lead, *rows), dtype=torch.float16, device=device)
        self.zero = None if cfg.symmetric else torch.zeros_like(self.scale)
        self.res_dtype = res_dtype
        if not self.direct:
            self.res = torch.zeros((*lead, self.residual + self.gran, D), dtype=res_dtype, device=device)

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.res) if t is not None]

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Codes, scale, zero of ``x`` (B, H, T, D), T a whole number of groups: the storage's quantizer."""
        if self.cfg.axis == "token":
            return quantize_tokens(x, self.cfg.bits, self.cfg.group_size, self.cfg.symmetric, self.backend)
        q = quantize(x, self.cfg)
        return q.codes, q.scale, q.zero

    def put(self, layer: int, at: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None,
            flush: Tensor | None = None) -> None:
        """Write whole groups of codes at prefix slots ``at``; with ``flush`` (0-d bool) only where it is True."""
        rows = at if self.cfg.axis == "token" else at[:: self.cfg.group_size] // self.cfg.group_size
        for buf, new, idx in ((self.codes, codes, at), (self.scale, scale, rows), (self.zero, zero, rows)):
            if buf is not None:
                if flush is not None:
                    new = torch.where(flush, new, buf[layer].index_select(2, idx))
                buf[layer].index_copy_(2, idx, new)

    def append(self, layer: int, x: Tensor) -> None:
        """Add x (B, H, T, D), already in the residual dtype, by this step's ``count``."""
        T = x.shape[2]
        if T == 1:
            self._append_one(layer, x)
            return
        n_new = self.n_host  # a multi-token step (prefill) is never captured: host counts are fine
        q_old, q_new = self.split(n_new - T), self.split(n_new)
        full = torch.cat([self.res[layer][:, :, : n_new - T - q_old], x], 2)
        m = q_new - q_old
        if m:
            at = torch.arange(q_old, q_new, device=x.device)
            self.put(layer, at, *self.quantize(full[:, :, :m]))
        self.res[layer][:, :, : full.shape[2] - m] = full[:, :, m:]

    def _append_one(self, layer: int, x: Tensor) -> None:
        res, g = self.res[layer], self.gran
        res.index_copy_(2, self.res_slot, x)
        self.put(layer, self.at, *self.quantize(res[:, :, :g]), flush=self.flush)
        res.copy_(torch.where(self.flush, torch.cat([res[:, :, g:], res[:, :, :g]], 2), res))

    def side(self, layer: int) -> Packed:
        """The layer's buffers as a kernel side (prefix capacity + residual; the counts come as ``lengths``)."""
        c = self.cfg
        zero = None if self.zero is None else self.zero[layer]
        res = None if self.res is None else self.res[layer]
        return Packed(self.codes[layer], self.scale[layer], zero, res, c.bits, c.group_size, c.axis)

    def tokens(self, layer: int, capacity: int, dtype: torch.dtype) -> Tensor:
        """All ``capacity`` slots in ``dtype``, branch-free: token t is prefix code t below this step's ``n_q``,
        else residual slot ``t - n_q`` (slots at or beyond the token count are junk the positions mask)."""
        side = self.side(layer)
        prefix = dequant_prefix(side, 0, side.codes.shape[2])[:, :, :capacity].to(dtype)
        if side.res is None:
            return prefix
        q = self.n_q
        t = torch.arange(capacity, device=prefix.device)
        res = side.res.index_select(2, (t - q).clamp(0, side.res.shape[2] - 1)).to(dtype)
        return torch.where((t < q)[:, None], prefix, res)


class StaticQuantKVCache(FixedSlotCache):
    """The quantized storage (``storage.quant.store.QuantizedStore``) in static-capacity buffers.

    Settings mirror the storage's: ``bits``, ``group_size`` (channels per group for per-token groups, tokens
    for per-channel ones; ``key_group_size`` / ``value_group_size`` override one side), ``key_axis`` /
    ``value_axis`` (``token`` | ``channel``: KIVI keys), ``residual`` recent tokens in ``residual_dtype`` (None:
    the model's). Attention reads the codes (``kernels.quant_attention``): with Triton only the held tokens'
    bytes, their counts read on the device; the reference dequantizes the capacity, empty slots masked.
    """

    def __init__(self, capacity: int, bits: int = 4, group_size: int = 64, symmetric: bool = False,
                 residual_dtype: torch.dtype | None = torch.float16, device: torch.device | str | None = None,
                 backend: str | None = None, residual: int = 0, key_axis: str = "token", value_axis: str = "token",
                 key_group_size: int | None = None, value_group_size: int | None = None):
        super().__init__(None, capacity, device=device)
        self.residual_dtype, self.backend, self.residual = residual_dtype, backend, residual
        self.parts: list[StaticPart] = []
        self.configs = [QuantConfig(bits, key_group_size or group_size, key_axis, symmetric),
                        QuantConfig(bits, value_group_size or group_size, value_axis, symmetric)]

    def setup(self, spec: ModelSpec) -> None:
        for name, cfg in zip(("key", "value"), self.configs, strict=True):
            cfg.check_head_dim(spec.head_dim, f"{name}_group_size (or group_size)")
        super().setup(spec)

    def payload(self) -> list[Tensor]:
        return [t for part in self.parts for t in part.tensors()]

    def allocate_payload(self, dtype: torch.dtype, device: torch.device) -> None:
        s = self.spec
        self.parts = [StaticPart(cfg, self.residual, self.backend) for cfg in self.configs]
        for part in self.parts:
            part.allocate((s.num_layers, self.batch_size, s.num_kv_heads), self.capacity, s.head_dim,
                          self.residual_dtype or dtype, device)

    @property
    def slot_addressable(self) -> bool:
        """Per-token groups, no residual: any token can be written at any slot (an eviction policy's slots)."""
        return all(cfg.axis == "token" for cfg in self.configs) and not self.residual

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """Per-token codes go to ``slots``; with a residual or per-channel groups the tokens are the next ones
        (``slots`` = index - T + [0, T)) and each part places them by its own count."""
        for part, x in zip(self.parts, (k, v), strict=True):
            x = x.to(part.res_dtype)
            if part.direct:
                part.put(layer, slots, *part.quantize(x))
                continue
            if layer == 0:
                part.count(self.index, x.shape[2])
            part.append(layer, x)

    def slot_tokens(self, layer: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values of every slot of a layer, dequantized (B, Hkv, capacity, D) (slot-addressable only)."""
        k, v = (dequant_prefix(p.side(layer), 0, self.capacity).to(dtype) for p in self.parts)
        return k, v

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        k, v = self.parts
        if resolve(q.device, self.backend) == "triton":
            if layer == 0:  # [n_q of K, n_q of V, T], once per step for every layer
                self.lengths = torch.stack([k.split(self.index), v.split(self.index), self.index]).to(torch.int32)
            return quant_attention(q, q_pos, self.pos, k.side(layer), v.side(layer), lengths=self.lengths,
                                   backend=self.backend)
        sides = (dense(part.tokens(layer, self.capacity, q.dtype)) for part in self.parts)
        return quant_attention(q, q_pos, self.pos, *sides, backend=self.backend)
