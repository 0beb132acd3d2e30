"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"): score each
context token by the attention it receives while the model *reconstructs* the context, so the compressed cache
serves any later question, not only the one in the prompt.

After prefill the engine feeds the replay right after the prompt (``KVCache.replay_wanted``: the cost is a second
prefill, recorded as ``replay_tokens``): the paper's instruction ``repeat`` ("\\n\\nRepeat the previous context
exactly."), the chat template's assistant header (what the template writes after a user turn; "\\n" for a
tokenizer without a template), then the prompt again (``replay_prefix``: the ids, tokenised at calibration, as
kvpress's KVzipPress does). With w[h, q, i] the softmax weight of replay query q of query head h on held context
token i (the replay attends to the context and to its own earlier tokens),

    score[g, i] = max over the query heads h of KV head g and over every replay query q of w[h, q, i]
                  (``group=mean``: the mean over those h of max_q w[h, q, i], KVCompose's aggregation),

then the replayed tokens are dropped and the context is compressed once (``when=prefill`` or ``both``).

Budget (``scope``; the ranking is ``cache/policy/global_budget.py``'s): ``global`` (default, the paper's): one
top-k over every (layer, KV head, token) of the model, K = layers x Hkv x budget per row, the floor 0; the scores
are softmax weights in every layer, so they rank across layers unnormalised. ``layerwise``: the top-k within each
layer (heads compete, every layer keeps Hkv x budget). ``layer``: one selection per layer shared by its heads
(``per_head``: per head, equal counts) with the base keep rule; ``when=decode`` (no replay) is always per layer.
Departures from kvpress 0.5.5: the prompt is replayed in one pass (kvpress replays 2,048-token chunks, each scored
against the sinks and its own chunk only: the same for prompts up to 2,048 tokens); kvpress takes the context to
start with the chat template's system and user header and leaves that header's tokens after the 4 sinks unscored
(evicted first), ours scores every prompt token. ``repeat: null``, or a run without a tokenizer (the contract
suite's random calibration), replays the bare prompt. Without a replay (an evaluation that drives the model
itself) the max is taken over the last 32 prompt queries (``when=decode``: over every query), so the
explicit-softmax weights of a whole prompt are computed only in the replay.
"""
from __future__ import annotations

from torch import Tensor

from kvcompress.cache.checks import one_of
from kvcompress.cache.policy.base import EvictionPolicy
from kvcompress.cache.policy.global_budget import GlobalRanking
from kvcompress.cache.policy.score import Candidates

FALLBACK = 32
REPEAT = "\n\nRepeat the previous context exactly."  # the paper's (and kvpress's) instruction for one chunk
GROUPS = ("max", "mean")  # how the query heads of a KV head combine
MARK = "\x00kvzip\x00"  # a user turn's content, to cut the chat template's assistant header out of its rendering


def repeat_ids(tokenizer, repeat: str) -> list[int]:
    """The instruction's ids, then the assistant header's ("\\n" without a chat template), each tokenised alone."""
    if getattr(tokenizer, "chat_template", None) is None:
        header = "\n"
    else:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], add_generation_prompt=True,
                                                 tokenize=False)
        header = rendered.split(MARK, 1)[1]
    return [*tokenizer.encode(repeat, add_special_tokens=False), *tokenizer.encode(header, add_special_tokens=False)]


class KVzip(GlobalRanking, EvictionPolicy):
    """Max attention over the replay's queries; ``sinks`` defaults to 4 as in the paper's code."""

    replays = True

    def __init__(self, budget: int | float = 512, sinks: int = 4, scope: str = "global", granularity: str = "head",
                 floor: float = 0.0, normalize: str = "none", repeat: str | None = REPEAT, group: str = "max",
                 **kwargs):
        self.group = one_of("policy.group", group, GROUPS)
        if repeat is not None and not isinstance(repeat, str):
            raise ValueError(f"policy.repeat must be a string (the replay's instruction) or null (the bare prompt), "
                             f"got {repeat!r}")
        self.repeat, self.prefix = repeat or None, []
        if kwargs.get("when", "decode") == "decode":
            scope = "layer"  # no replay, no prompt boundary: the scores of ordinary queries, per layer
        kwargs["per_head"] = self.init_ranking(scope, granularity, floor, normalize) or kwargs.get("per_head", False)
        super().__init__(budget=budget, sinks=sinks, **kwargs)

    def calibrate(self, ctx, cache_for=None) -> None:
        tokenizer = getattr(ctx, "tokenizer", None)  # a calibration without one (random, in tests): bare replay
        self.prefix = repeat_ids(tokenizer, self.repeat) if self.repeat and tokenizer is not None else []

    def replay_prefix(self) -> list[int]:
        return list(self.prefix)

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
        w = weights.float().view(b, hkv, hq // hkv, n, t).amax(3)  # (B, Hkv, G, T): each query head's max
        w = w.amax(2) if self.group == "max" else w  # ``mean`` keeps the heads apart until scored
        return w if old is None else old.maximum(w)

    def score(self, c: Candidates) -> Tensor:
        if c.state is None:
            return c.zeros()
        return c.state.mean(2) if self.group == "mean" else c.state
