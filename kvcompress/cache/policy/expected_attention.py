"""Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution"; kvpress's ExpectedAttentionPress): score a key by the attention that *future*
queries are expected to give it, in closed form from the statistics of the queries seen so far.

Pre-RoPE queries of a head are modelled as q ~ N(mu, Sigma) (mean and covariance of every query seen since reset,
positions < ``sinks`` left out). A future query at position p is R(p) q; averaging the rotation over the next
``future`` positions, R = mean_p R(p), gives mu' = R mu and Sigma' = R Sigma R^T. For a held (rotated) key k_i the
expected unnormalised attention is the Gaussian moment generating function

    E[exp(q.k_i / sqrt(d))] = exp(mu'.k_i / sqrt(d) + k_i^T Sigma' k_i / (2 d)),

normalised over the held keys (a softmax of the exponent, sinks left out), averaged over the query heads of a KV
head, and multiplied by ||v_i|| (``vnorm``):  score_i = (softmax_i(z) + epsilon) * ||v_i||; sinks score the maximum.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION, expand_heads
from kvcompress.cache.checks import int_at_least, number_in
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.storage.base import TokenStore


class ExpectedAttention(EvictionPolicy):
    """Closed-form expected attention from running query statistics (the ``observe_queries`` hook).

    ``sinks`` defaults to 4 (kvpress's n_sink): they are kept, and their queries and keys are left out of the
    statistics and the softmax. Statistics are per store and row: (B, Hq, D) sums and (B, Hq, D, D) second moments,
    counted in ``kv_bytes``.
    """

    wants_queries = True

    def __init__(self, budget: int | float = 512, sinks: int = 4, future: int = 512, covariance: bool = True,
                 vnorm: bool = True, epsilon: float = 0.0, **kwargs):
        self.future = int_at_least("policy.future", future, 1)
        self.covariance, self.vnorm = bool(covariance), bool(vnorm)
        self.epsilon = number_in("policy.epsilon", epsilon, 0.0, math.inf)
        super().__init__(budget=budget, sinks=sinks, **kwargs)

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.stats: dict[int, list[Tensor]] = {}

    def before_attend(self, owner: int, store: TokenStore, steps: int) -> None:
        super().before_attend(owner, store, steps)
        if self.when == "prefill" and self.compressed[owner]:
            self.stats.pop(owner, None)  # compressed for good: the statistics are freed

    def update_queries(self, owner: int, q: Tensor, q_pos: Tensor, rope) -> None:
        self.rope = rope
        use = ((q_pos < PAD_POSITION) & (q_pos >= self.sinks)).float()[:, None, :, None]  # (B, 1, n, 1)
        x = rope.rotate(q, -q_pos).float() * use  # back to pre-RoPE
        new = [use.sum((1, 2, 3)), x.sum(2), x.transpose(-1, -2) @ x if self.covariance else x.new_zeros(())]
        old = self.stats.get(owner)
        self.stats[owner] = new if old is None else [a + b for a, b in zip(old, new, strict=True)]

    def score(self, c: Candidates) -> Tensor:
        stats, pos = self.stats.get(c.owner), c.pos
        if stats is None:
            return c.zeros()
        k, v = c.keys(), c.values()
        real = pos < PAD_POSITION
        nxt = torch.where(real, pos, -1).flatten(1).amax(1) + 1  # each row's next position
        z = expected_logits(k.float(), *stats, self.rope_mean(nxt, k.shape[-1]), self.covariance)  # (B, Hq, T)
        drop = ~real | (pos < self.sinks)  # (B, 1|Hkv, T): padding and sinks take no part in the softmax
        z = z.masked_fill(expand_heads(drop, z.shape[1] // drop.shape[1]), float("-inf"))
        s = z.softmax(-1).nan_to_num(0.0).view(k.shape[0], k.shape[1], -1, k.shape[2]).mean(2)
        s = (s + self.epsilon) * v.float().norm(dim=-1) if self.vnorm else s
        # sinks score the maximum (as kvpress pads them), so they stay under a wrapper with no sinks of its own
        return torch.where((pos < self.sinks) & real, s.amax(-1, keepdim=True), s)

    def rope_mean(self, nxt: Tensor, d: int) -> Tensor:
        """Per row, the mean rotation matrix (B, D, D) over positions nxt .. nxt + future - 1."""
        p = nxt[:, None] + torch.arange(self.future, device=nxt.device)
        cos, sin = (t.float().mean(1) for t in self.rope.cos_sin(p, torch.float32))  # (B, D): rotate-half layout
        half = torch.eye(d, device=nxt.device)
        swap = torch.cat([-half[d // 2:], half[: d // 2]])  # rotate_half(x) = swap @ x
        return torch.diag_embed(cos) + sin[:, :, None] * swap

    def tensors(self) -> list[Tensor]:
        return super().tensors() + [t for s in self.stats.values() for t in s if t.dim()]


def expected_logits(k: Tensor, n: Tensor, s1: Tensor, s2: Tensor, rot: Tensor, covariance: bool) -> Tensor:
    """z[b, h, i] = mu'.k_i / sqrt(d) + k_i^T Sigma' k_i / (2d) for query head h (keys (B, Hkv, T, D) shared by
    Hq / Hkv query heads), with mu = s1 / n, Sigma = s2 / n - mu mu^T, rotated by ``rot`` (B, D, D)."""
    b, hkv, t, d = k.shape
    n = n.clamp_min(1.0)[:, None, None]
    mu = s1 / n  # (B, Hq, D)
    kk = expand_heads(k, mu.shape[1] // hkv)  # (B, Hq, T, D)
    z = (kk @ torch.einsum("bij,bhj->bhi", rot, mu)[..., None])[..., 0] / math.sqrt(d)
    if covariance:
        cov = s2 / n[..., None] - mu[..., :, None] * mu[..., None, :]
        cov = rot[:, None] @ cov @ rot[:, None].transpose(-1, -2)
        z = z + ((kk @ cov) * kk).sum(-1) / (2 * d)
    return z
