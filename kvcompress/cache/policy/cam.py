"""CaM (Zhang et al., 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML): an evicted token's
value is merged into the kept tokens that follow it instead of being dropped; tokens are chosen as in H2O.

For an evicted token e with accumulated attention A_e (H2O's score) and its merge window W_e (the next ``window``
kept tokens after it, in position order), the merge probability is p_e = clamp(A_e / mean_{j in W_e} A_j, 0, 1),
and every j in W_e receives

    v_j <- v_j + p_e * v_e / |W_e|                                  (``normalize=false``: the paper's form)
    v_j <- (v_j + sum_e p_e v_e / |W_e|) / (1 + sum_e p_e / |W_e|)   (``normalize=true``, default)

The paper (and kvpress's CAMPress) draws the merge with probability p_e; this is its expectation (deterministic, so
batch rows and repeated runs agree). The additive form is meant for one eviction per decode step; compressing a
prompt at once (``when=prefill``) adds dozens of values into each kept token and blows the values up (SmolLM2-135M,
25% of 2,048 tokens: ppl 1845 against H2O's 25.7), so by default the kept value and the merged ones are averaged
(weights 1 and p_e / |W_e|), which keeps the value scale. Values are written back through
``TokenStore.update_values``: in place for dense storage, re-encoded from the held keys and the merged values for
any other storage (a quantized store re-quantizes: one re-encode of the store per eviction).

``merge=every`` (default) merges every evicted value; ``merge=decode`` is the paper's (and kvpress's) decode-time
form: only an eviction that drops one token per row (a decode step past the budget) merges it, and a prompt
compressed at once drops its tokens unmerged (with ``normalize=false``: the paper's additive merge, one value
per step).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.buffers import fit
from kvcompress.cache.checks import int_at_least, one_of
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.storage.base import TokenStore

MERGES = ("every", "decode")


class CaM(H2O):
    """H2O selection + merging of the evicted values (``window`` kept successors per evicted token)."""

    def __init__(self, budget: int | float = 512, window: int = 32, normalize: bool = True, merge: str = "every",
                 **kwargs):
        self.window = int_at_least("policy.window", window, 1)
        self.normalize = bool(normalize)
        self.merge = one_of("policy.merge", merge, MERGES)
        super().__init__(budget=budget, **kwargs)

    captured = False  # merging reads kept slots in position order: eager only
    rewrites_values = True

    def merge_evicted(self, owner: int, store: TokenStore, idx: Tensor) -> None:
        if not store.values_writable:
            raise ValueError(f"policy=cam cannot rewrite values in {type(store).__name__} (layout=minicache shares a "
                             "merged direction between two layers); use layout=per_layer or cla")
        acc = fit(self.state[owner], store.length)
        if acc is None or (self.merge == "decode" and store.length - idx.shape[-1] > 1):
            return
        _, v, pos = store.read()
        v = merge_values(v.float(), acc.float(), pos if pos.dim() == 3 else pos[:, None], idx, self.window,
                         self.normalize)
        store.update_values(v)


def merge_values(v: Tensor, acc: Tensor, pos: Tensor, idx: Tensor, window: int, normalize: bool = False) -> Tensor:
    """Values (B, Hkv, T, D) with every evicted real slot merged into its next ``window`` kept slots (slot order).

    ``acc`` (B, 1|Hkv, T) is the accumulated attention, ``pos`` (B, 1|Hkv, T), ``idx`` the kept slots (B, [H,] K)."""
    b, heads, t, _ = v.shape  # a shared selection (1 head) merges every head's values along the same slots
    idx = idx if idx.dim() == 3 else idx[:, None]
    kept = torch.zeros(b, heads, t, dtype=torch.bool, device=v.device).scatter_(-1, idx.expand(b, heads, -1), True)
    evicted = ~kept & (pos < PAD_POSITION).expand(b, heads, t)
    # for slot i, the kept slots after it: its window is kept slots with rank (number of kept slots before i) .. + w
    before = kept.long().cumsum(-1) - kept.long()  # kept slots strictly before slot i
    n_kept = idx.shape[-1]
    offsets = torch.arange(window, device=v.device)
    target = before[..., None] + offsets  # (B, H, T, w): ranks among kept slots
    valid = (target < n_kept) & evicted[..., None]
    slots = idx.expand(b, heads, -1).gather(-1, target.clamp(max=n_kept - 1).flatten(2)).view(b, heads, t, window)
    a = acc.expand(b, heads, t)
    mean = (a.gather(-1, slots.flatten(2)).view(b, heads, t, window) * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    p = torch.where(mean > 0, a / mean.clamp_min(1e-30), 1.0).clamp(0.0, 1.0) * valid.any(-1)
    share = p / valid.sum(-1).clamp_min(1)  # (B, H, T): weight of v_e added to each slot of its window
    contrib = (v * share[..., None])[..., None, :] * valid[..., None]  # (B, H, T, w, D)
    out = v.clone()
    out.scatter_add_(2, slots.flatten(2)[..., None].expand(-1, -1, -1, v.shape[-1]), contrib.flatten(2, 3))
    if normalize:  # divide by 1 + the merged weights each kept slot received
        mass = torch.ones(b, heads, t, device=v.device).scatter_add_(
            2, slots.flatten(2), (share[..., None] * valid).flatten(2))
        out = out / mass[..., None]
    return out
