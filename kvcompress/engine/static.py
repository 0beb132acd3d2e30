"""A static-capacity dense KV cache and a decode step that can be captured (CUDA graph) and replayed.

Every buffer is allocated once, at ``reset``, to ``capacity`` tokens: keys (rotated) and values
(L, B, Hkv, capacity, D), positions (B, capacity) filled with ``PAD_POSITION`` (invisible to every real
query), and a write index, a 0-d device tensor. A forward writes its T tokens to slots
``index + [0, T)`` with ``index_copy_`` and the last layer advances the index in place, so a step has
fixed shapes, no host synchronisation and no Python branch on data: the whole step (embedding to
logits) can be recorded once and replayed. Attention runs over the whole capacity with the mask
``key_pos <= query_pos``; empty slots are masked, so the result equals the growing full cache's.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, KVCache, ModelSpec, Rotary


class StaticKVCache(KVCache):
    """Dense K/V of every layer in fixed buffers of ``capacity`` tokens (the full cache, captured-decode form)."""

    def __init__(self, capacity: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.k = self.v = self.pos = self.index = None

    def setup(self, spec: ModelSpec) -> None:
        if self.capacity > spec.max_position:
            raise ValueError(f"capacity={self.capacity} must be <= max_position={spec.max_position}")
        super().setup(spec)

    def reset(self, batch_size: int) -> None:
        """Allocate (first call, or another batch size / dtype) or clear the buffers; addresses stay fixed."""
        s, dev = self.spec, torch.device(self.device or "cpu")
        shape = (s.num_layers, batch_size, s.num_kv_heads, self.capacity, s.head_dim)
        dtype = self.dtype or torch.float32
        if self.k is None or self.k.shape != shape or self.k.dtype != dtype or self.k.device != dev:
            self.k, self.v = torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev)
            self.pos = torch.empty((batch_size, self.capacity), dtype=torch.int64, device=dev)
            self.index = torch.zeros((), dtype=torch.int64, device=dev)
        self.k.zero_()
        self.v.zero_()
        self.pos.fill_(PAD_POSITION)
        self.index.zero_()

    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor, rope: Rotary) -> None:
        slots = self.index + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, slots, rope.rotate(k, pos).to(self.k.dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        if layer == 0:
            self.pos.index_copy_(1, slots, pos)
        if layer == self.spec.num_layers - 1:
            self.index.add_(k.shape[2])

    def attend(self, layer: int, q: Tensor, q_pos: Tensor) -> Tensor:
        mask = self.pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, Tq, capacity)
        k, v = self.k[layer].to(q.dtype), self.v[layer].to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def tensors(self) -> Iterable[Tensor]:
        """The whole capacity is held (a static cache reserves it up front)."""
        return [] if self.k is None else [self.k, self.v, self.pos, self.index]

    @property
    def tokens_seen(self) -> int:
        return 0 if self.pos is None else int((self.pos < PAD_POSITION).sum())


def decode_step(model, tokens: Tensor, pos: Tensor, cache: KVCache) -> Tensor:
    """One forward of new tokens (B, T) at positions (B, T): logits (B, T, V). The eager form."""
    return model(tokens, pos, cache)


class CapturedDecode:
    """``decode_step`` of one token per row recorded once as a CUDA graph over a ``StaticKVCache``, then replayed.

    ``__call__(tokens (B, 1), pos (B, 1))`` copies its inputs into the static input buffers, replays, and
    returns the static logits buffer (overwritten by the next call: clone to keep it). Where no CUDA graph
    exists (CPU) it runs the eager step, so callers need no branch; ``captured`` says which ran.
    """

    def __init__(self, model, cache: StaticKVCache, batch_size: int, warmup: int = 2):
        self.model, self.cache = model, cache
        dev = model.device
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        # dynamic NTK rope reads max(pos) on the host each step: such a step cannot be recorded
        self.captured = dev.type == "cuda" and getattr(model.rope, "kind", "default") != "dynamic"
        self.graph, self.logits = None, None
        if self.captured:
            model.rope.inv_freq = model.rope.inv_freq.to(dev)  # no host-to-device copy inside the graph
            self._capture(warmup)

    @torch.inference_mode()
    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream (allocator, kernels), then record one step; the cache state is restored."""
        saved = [t.clone() for t in self.cache.tensors()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                decode_step(self.model, self.tokens, self.pos, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(self.model, self.tokens, self.pos, self.cache)
        for t, s in zip(self.cache.tensors(), saved, strict=True):
            t.copy_(s)

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, pos: Tensor) -> Tensor:
        if not self.captured:
            return decode_step(self.model, tokens, pos, self.cache)
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits
