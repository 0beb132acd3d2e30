"""A decode step captured as a CUDA graph and replayed, over a cache's static-capacity form.

``static_form(cache, capacity)`` asks the cache for an equivalent whose buffers never move (a storage's codec in
fixed slots, ``cache.storage.fixed``; an eviction policy's fixed budget over it, ``cache.policy.captured``: written
at device-side slots, so a step has fixed shapes and no host synchronisation); ``CapturedDecode`` records one
decode step over it once and replays it. Where there is no
CUDA graph (CPU) the same static step runs eagerly, so callers need no branch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import KVCache


def static_form(cache: KVCache, capacity: int) -> KVCache | None:
    """The cache's static-capacity equivalent, when it declares one (``cache.static_form(capacity)``: the storage's
    ``static_form``, or the policy's over it), else None: that cache decodes eagerly."""
    hook = getattr(cache, "static_form", None)
    return None if hook is None else hook(capacity)


def decode_step(model, tokens: Tensor, pos: Tensor, cache: KVCache) -> Tensor:
    """One forward of new tokens (B, T) at positions (B, T): logits (B, T, V). The eager form."""
    return model(tokens, pos, cache)


class CapturedDecode:
    """``decode_step`` of one token per row recorded once as a CUDA graph over a ``StaticKVCache``, then replayed.

    ``__call__(tokens (B, 1), pos (B, 1))`` copies its inputs into the static input buffers, replays, and
    returns the static logits buffer (overwritten by the next call: clone to keep it). Where no CUDA graph
    exists (CPU) it runs the eager step, so callers need no branch; ``captured`` says which ran.
    """

    def __init__(self, model, cache: KVCache, batch_size: int, warmup: int = 2):
        self.model, self.cache = model, cache
        dev = model.device
        self.tokens = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        # dynamic NTK rope reads max(pos) on the host each step: such a step cannot be recorded
        self.captured = dev.type == "cuda" and getattr(model.rope, "kind", "default") != "dynamic"
        self.graph, self.logits = None, None
        if self.captured:
            self._capture(warmup)

    @torch.inference_mode()
    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream (allocation, kernels), then record one step; the cache state is restored."""
        saved = [t.clone() for t in self.cache.tensors()]
        if not saved:  # allocate on this stream first (the junk this step writes is cleared below)
            decode_step(self.model, self.tokens, self.pos, self.cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                decode_step(self.model, self.tokens, self.pos, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_step(self.model, self.tokens, self.pos, self.cache)
        if not saved:
            self.cache.reset(self.tokens.shape[0])  # same batch: cleared in place, addresses kept
        for t, s in zip(self.cache.tensors() if saved else (), saved, strict=True):
            t.copy_(s)

    @torch.inference_mode()
    def __call__(self, tokens: Tensor, pos: Tensor) -> Tensor:
        if not self.captured:
            return decode_step(self.model, tokens, pos, self.cache)
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits
