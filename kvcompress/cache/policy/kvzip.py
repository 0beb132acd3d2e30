"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"): score each
context token by the attention it receives while the model *reconstructs* the context, so the compressed cache
serves any later question, not only the one in the prompt.

After prefill the engine feeds the prompt once more, right after itself (``KVCache.replay_wanted``: the cost is a
second prefill, recorded as ``replay_tokens``). With w[h, q, i] the softmax weight of replay query q of query
head h on held context token i (the replay attends to the context and to its own earlier tokens),

    score[g, i] = max over the query heads h of KV head g and over every replay query q of w[h, q, i],

then the replayed tokens are dropped and the context is compressed once (``when=prefill`` or ``both``).

Budget (``scope``; the ranking is ``cache/policy/global_budget.py``'s): ``global`` (default, the paper's): one
top-k over every (layer, KV head, token) of the model, K = layers x Hkv x budget per row, the floor 0; the scores
are softmax weights in every layer, so they rank across layers unnormalised. ``layerwise``: the top-k within each
layer (heads compete, every layer keeps Hkv x budget). ``layer``: one selection per layer shared by its heads
(``per_head``: per head, equal counts) with the base keep rule; ``when=decode`` (no replay) is always per layer.
Departures from the paper: the replay is the context alone (the engine has no tokenizer, so no "Repeat the
previous context:" instruction), in one pass rather than 2k-token chunks. Without a replay (an evaluation that
drives the model itself) the max is taken over the last 32 prompt queries (``when=decode``: over every query), so
the explicit-softmax weights of a whole prompt are computed only in the replay.
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.global_budget import GlobalRanking
from kvcompress.cache.policy.score import Candidates

FALLBACK = 32


class KVzip(GlobalRanking, EvictionPolicy):
    """Max attention over the replay's queries; ``sinks`` defaults to 4 as in the paper's code."""

    replays = True

    def __init__(self, budget: int | float = 512, sinks: int = 4, scope: str = "global", granularity: str = "head",
                 floor: float = 0.0, normalize: str = "none", **kwargs):
        if kwargs.get("when", "decode") == "decode":
            scope = "layer"  # no replay, no prompt boundary: the scores of ordinary queries, per layer
        if self.init_ranking(scope, granularity, floor, normalize):
            kwargs["per_head"] = True
        super().__init__(budget=budget, sinks=sinks, **kwargs)

    def reset(self, batch_size: int, owners: list[int]) -> None:
        super().reset(batch_size, owners)
        self.replaying = False

    def start_replay(self) -> None:
        super().start_replay()
        self.replaying = True

    def start_step(self, steps: int, pos) -> None:
        super().start_step(steps, pos)
        self.replaying = False  # steps are not counted during the replay: the first one after it ends it

    def queries_needed(self, owner: int, steps: int) -> int:
        # every replay query; otherwise the last FALLBACK queries (a cheap score should no replay follow)
        return steps if self.replaying or self.when == "decode" else min(steps, FALLBACK)

    def update(self, weights: Tensor, old: Tensor | None, heads: int) -> Tensor:
        b, hq, n, t = weights.shape
        hkv = self.spec.num_kv_heads  # per KV head whatever ``heads``: evict averages them for a shared selection
        w = weights.float().view(b, hkv, hq // hkv, n, t).amax((2, 3))  # (B, Hkv, T)
        return w if old is None else old.maximum(w)

    def score(self, c: Candidates) -> Tensor:
        return c.state if c.state is not None else c.zeros()
