"""DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
Heads"): retrieval heads keep every token; streaming heads keep only the sinks and a recent window.

The head split is calibrated training-free (the paper trains gates; here each head is measured directly): on
synthetic passkey prompts (``CalibrationContext.retrieval_nll``: random spans planted in calibration text, recalled
at the end), head (l, g) alone is made a streaming head and the rise of the recall NLL is its retrieval score
r[l, g]. Saved with ``artifacts.save`` under ``ctx.cache_dir``, keyed by ``ctx.key`` and the probe settings.

Budget: with N = stores x KV heads, a store budget b per head, T tokens seen by the row and a streaming window
w = sinks + recent (recent may be a fraction of b), the R = floor(N (b - w) / (T - w)) heads with the largest r
(over all stores, as the paper thresholds its gates globally) are retrieval heads, so the row holds
R T + (N - R) w <= N b tokens. Layers then hold different counts per head, kept as AdaKV does (``keep_per_head``):
a codec storage holds them in pages (``cache.pages``: each head's own tokens), a storage that is not a codec pads
every head of a layer with one retrieval head to T slots (counted in ``kv_bytes``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from kvcompress.cache import artifacts
from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.checks import int_at_least
from kvcompress.cache.policy.base import CacheUnder, Policy
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.policy.wrapper import UnevenHeads
from kvcompress.cache.storage.base import TokenStore


class DuoAttention(UnevenHeads):
    """Retrieval heads keep all, streaming heads sinks + recent; ``probe_recent`` is a streamed head's window while
    calibrating; ``calibration_file`` names a saved split (null: under the calibration folder, by key)."""

    def __init__(self, budget: int | float = 512, sinks: int = 4, recent: int | float = 0.25, probe_recent: int = 64,
                 calibration_file: str | None = None, **kwargs):
        self.probe_recent = int_at_least("policy.probe_recent", probe_recent, 1)
        self.calibration_file = calibration_file
        self.head_scores: Tensor | None = None
        self.probe: tuple[int, int] | None = None  # calibration: stream exactly this (layer, head)
        super().__init__(budget=budget, sinks=sinks, recent=recent, **kwargs)

    # -- calibration ------------------------------------------------------------------------------
    def calibrate(self, ctx, cache_for: CacheUnder | None = None) -> None:
        name = f"duo-{ctx.key}-sinks{self.sinks}-probe{self.probe_recent}.pt"
        path = Path(self.calibration_file or Path(ctx.cache_dir) / name).expanduser()
        split, _ = artifacts.cached(path, lambda: {"retrieval_scores": self.measure(ctx, cache_for), "key": ctx.key},
                                    "DuoAttention head split")
        scores = split["retrieval_scores"]
        if tuple(scores.shape) != (self.spec.num_layers, self.spec.num_kv_heads):
            raise ValueError(f"DuoAttention head split {path} is for another model (shape {tuple(scores.shape)})")
        self.head_scores, self.calibration_path = scores.float(), str(path)

    def measure(self, ctx, cache_for: CacheUnder | None) -> Tensor:
        """r[l, g] = recall NLL with head (l, g) streamed - recall NLL with every head full."""
        if cache_for is None:
            raise ValueError("policy=duo_attention measures its head split through probe caches: calibrate it "
                             "through the composed cache (ComposedCache.calibrate passes cache_for)")
        probe_nll = getattr(ctx, "retrieval_nll", None)
        if probe_nll is None:
            raise ValueError("policy=duo_attention calibrates on synthetic passkey prompts, so the calibration "
                             "context must offer retrieval_nll(cache) (kvcompress.eval.calibration does)")

        def nll(head: tuple[int, int] | None) -> float:
            probe = DuoAttention(budget=self.sinks + self.probe_recent, sinks=self.sinks, recent=self.probe_recent)
            probe.probe = head
            return probe_nll(cache_for(probe if head is not None else Policy()))

        base = nll(None)
        heads = [(la, g) for la in range(self.spec.num_layers) for g in range(self.spec.num_kv_heads)]
        return torch.tensor([nll(h) - base for h in heads]).view(self.spec.num_layers, self.spec.num_kv_heads)

    # -- eviction ---------------------------------------------------------------------------------
    def streaming(self, owner: int, budget: int, window: int) -> Tensor:
        """(Hkv,) True for the store's streaming heads."""
        heads = self.spec.num_kv_heads
        if self.probe is not None:
            return torch.arange(heads) == self.probe[1] if owner == self.probe[0] else torch.zeros(heads, dtype=bool)
        if self.head_scores is None:
            raise RuntimeError("policy=duo_attention needs calibrate(ctx) before use (its head split)")
        owners = sorted(self.compressed)
        seen = int(self.row_seen.max())
        n = len(owners) * heads
        r = n if seen <= window else max(0, min(n, math.floor(n * (budget - window) / (seen - window))))
        order = self.head_scores[owners].flatten().argsort(descending=True, stable=True)
        retrieval = torch.zeros(n, dtype=torch.bool).index_fill_(0, order[:r], True).view(len(owners), heads)
        return ~retrieval[owners.index(owner)]

    def evict(self, owner: int, store: TokenStore, protect: int = 0) -> None:
        budget = self.target(owner)
        window = min(self.sinks + self.recent_tokens(budget), budget)
        stream = self.streaming(owner, budget, window).to(store.positions().device)
        pos = self.head_positions(store)
        real = pos < PAD_POSITION
        if not bool(stream.any()) or int(real[:, stream].sum(-1).max()) <= window:
            return
        prio = self.priority(pos.float(), pos, window, protect)  # score = position: sinks + the most recent
        recent = torch.zeros_like(real).scatter_(-1, prio.topk(min(window, pos.shape[-1]), -1).indices, True)
        keep = torch.where(stream[None, :, None], recent & real, real)
        self.keep_heads(owner, store, keep)

    def score(self, c: Candidates) -> Tensor:
        return c.pos.float()

    def report(self) -> dict[str, float]:
        path = getattr(self, "calibration_path", None)
        return {**super().report(), **({"duo_calibration": path} if path else {})}
