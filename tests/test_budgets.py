"""Issue 24: one budget across layers and heads (global_budget, KVzip as published, KVCompose), PyramidKV's paper
schedule, random eviction re-seeded per step, ChunkKV's whole chunks, CaM's decode-time merge, CriticalKV: each
method's defining property on the tiny model or a hand-built example."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import spec_of, tiny_model
from omegaconf import OmegaConf

from kvcompress.cache import PAD_POSITION, ComposedCache, ModelSpec
from kvcompress.cache.policy.criticalkv import critical_scores
from kvcompress.cache.policy.global_budget import rank_max
from kvcompress.cache.policy.kvzip import KVzip
from kvcompress.cache.policy.score import Candidates
from kvcompress.cache.storage.dense import DenseStore
from kvcompress.engine.generate import forward_chunks, prefill
from kvcompress.testing.contract import make

CONF = Path(__file__).resolve().parents[1] / "conf" / "policy"
LAYERS, KV_HEADS, PROMPT = 4, 2, 40


def load(name: str, **settings):
    """conf/policy/<name>.yaml with its defaults list, instantiated with ``settings`` (the contract suite's loader)."""
    return make(name, "policy", **settings)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=KV_HEADS, num_hidden_layers=LAYERS)


def compressed(model, policy, rows=1, seed=0):
    """The cache after a prefill of PROMPT tokens per row (the engine's: replay, end_prompt), before any decode."""
    cache = ComposedCache(DenseStore(), policy)
    cache.setup(spec_of(model))
    cache.reset(rows)
    g = torch.Generator().manual_seed(seed)
    prefill(model, [torch.randint(0, 97, (PROMPT,), generator=g).tolist() for _ in range(rows)], cache, chunk=8)
    with torch.inference_mode():  # the first step after the prompt compresses before it attends
        model(torch.full((rows, 1), 5), torch.full((rows, 1), PROMPT), cache)
    return cache


def counts(cache) -> torch.Tensor:
    """(layers, B, heads) real tokens held."""
    pos = [v.positions() for v in cache.stores()]
    return torch.stack([((p[:, None] if p.dim() == 2 else p) < PAD_POSITION).sum(-1).expand(-1, KV_HEADS)
                        for p in pos])


SMALL = dict(budget=12, recent=4, scorer=dict(window=4))


def test_global_layer_granularity_holds_the_total_with_uneven_layers(model):
    cache = compressed(model, load("global_budget", granularity="layer", **SMALL))
    held = counts(cache)[:, 0, 0]  # heads share a selection; the decode token (protected) is in each layer's count
    assert int(held.sum()) == LAYERS * 12 + LAYERS - 1  # the layers after the first get the token after eviction
    assert len(set(held.tolist())) > 1
    full = compressed(model, None)  # every token: PROMPT + 1 per layer
    per_token = full.kv_bytes() // (LAYERS * (PROMPT + 1))
    assert cache.kv_bytes() == per_token * int(held.sum())  # one row: no padding, bytes follow the counts
    assert cache.kv_bytes_allocated() < full.kv_bytes_allocated()


def test_global_head_granularity_floor_and_padding(model):
    cache = compressed(model, load("global_budget", floor=0.5, **SMALL))
    held = counts(cache)[:, 0]  # (layers, heads)
    assert int(held.sum()) == LAYERS * KV_HEADS * 12 + (LAYERS - 1) * KV_HEADS
    assert len(set(held.flatten().tolist())) > 1 and (held >= 6).all()
    report = cache.memory_report()
    slots = sum(v.length for v in cache.stores()) * KV_HEADS
    assert report["padding_fraction"] == pytest.approx((slots - int(held.sum()) - (LAYERS - 1) * 0) / slots, abs=0.1)


def test_kvcompose_heads_of_a_layer_hold_equal_counts(model):
    knorm = OmegaConf.load(CONF / "scorer" / "knorm.yaml")  # the random model's attention is near-uniform per head
    cache = compressed(model, load("kvcompose", budget=12, scorer=knorm))
    held = counts(cache)[:, 0]
    assert (held[:, 0] == held[:, 1]).all() and len(set(held[:, 0].tolist())) > 1
    assert int(held[:, 0].sum()) == LAYERS * 12 + LAYERS - 1
    assert cache.memory_report()["padding_fraction"] == 0
    pos = [v.positions()[0] for v in cache.stores()]
    assert any(not torch.equal(p[0], p[1]) for p in pos)  # heads keep their own tokens


def test_kvcompose_first_layer_keeps_the_most(model):
    """first_layer_max: layer 0's composite scores are every layer's max at each rank, so it holds the most."""
    knorm = OmegaConf.load(CONF / "scorer" / "knorm.yaml")
    held = counts(compressed(model, load("kvcompose", budget=12, scorer=knorm)))[:, 0, 0]
    assert held[0] == held.max()
    plain = counts(compressed(model, load("kvcompose", budget=12, scorer=knorm, first_layer_max=False,
                                          head_mean=False)))[:, 0, 0]
    assert not torch.equal(plain, held) and int(plain.sum()) == int(held.sum())


def test_rank_max_and_kvzip_group_mean_by_hand():
    a, b = torch.tensor([[3.0, 1.0, 0.5]]), torch.tensor([[2.0, 2.0]])  # b: a store without this step's token
    assert rank_max([a, b]).tolist() == [[3.0, 2.0, 0.5]]
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]).view(1, 2, 1, 3)  # 2 query heads of 1 KV head, 1 query
    for group, want in (("max", [0.5, 0.3, 0.8]), ("mean", [0.3, 0.2, 0.5])):
        pol = KVzip(budget=2, sinks=0, group=group)
        pol.check(ModelSpec("by-hand", 1, 2, 1, 4, 64), DenseStore())
        pol.reset(1, [0])
        pol.observe(0, w, torch.arange(3)[None])
        c = Candidates(0, torch.arange(3).view(1, 1, 3), pol.state[0], 1, lambda: None)
        torch.testing.assert_close(pol.score(c)[0, 0], torch.tensor(want))


def test_kvzip_default_is_global_layerwise_per_layer(model):
    glob = counts(compressed(model, load("kvzip", budget=12)))[:, 0]
    assert int(glob.sum()) == LAYERS * KV_HEADS * 12 + (LAYERS - 1) * KV_HEADS and len(set(glob.sum(1).tolist())) > 1
    layerwise = counts(compressed(model, load("kvzip", budget=12, scope="layerwise")))[:, 0]
    assert (layerwise[0].sum() == KV_HEADS * 12).all() and (layerwise[1:].sum(1) == KV_HEADS * 13).all()
    assert len(set(layerwise.flatten().tolist())) > 1
    per_layer = counts(compressed(model, load("kvzip", budget=12, scope="layer")))
    assert (per_layer == 12).all()


class CharTokenizer:
    """One id per character; a chat template that wraps a user turn as <u>...<e> and opens the assistant's as <a>."""
    chat_template = "<u>{content}<e><a>"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<u>" + messages[0]["content"] + "<e>" + ("<a>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 97 for c in text]


def test_kvzip_replays_the_repeat_instruction_then_the_prompt(model, monkeypatch):
    policy = load("kvzip", budget=12)
    policy.calibrate(SimpleNamespace(tokenizer=CharTokenizer()))
    prefix = [ord(c) % 97 for c in "\n\nRepeat the previous context exactly.<e><a>"]
    assert policy.replay_prefix() == prefix
    fed, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda t, p, c, **kw: fed.append((t, p)) or forward(t, p, c, **kw))
    cache = compressed(model, policy, rows=2)
    replay = [(t, p) for t, p in fed if int(p.min()) >= PROMPT][:-1]  # the last call is the first decode step
    tokens, pos = torch.cat([t for t, _ in replay], 1), torch.cat([p for _, p in replay], 1)
    assert tokens[:, :len(prefix)].tolist() == [prefix] * 2
    assert torch.equal(tokens[:, len(prefix):], torch.cat([t for t, p in fed if int(p.max()) < PROMPT], 1))
    assert torch.equal(pos, torch.arange(PROMPT, 2 * PROMPT + len(prefix)).expand(2, -1))
    assert cache.memory_report()["replay_tokens"] == 2 * (PROMPT + len(prefix))
    bare = load("kvzip", budget=12, repeat=None)
    bare.calibrate(SimpleNamespace(tokenizer=CharTokenizer()))
    assert bare.replay_prefix() == []
    with pytest.raises(Exception, match=r"policy\.repeat"):
        load("kvzip", repeat=3)


def test_global_rows_rank_independently(model):
    one = compressed(model, load("global_budget", granularity="layer", **SMALL), rows=2, seed=3)
    held = counts(one)[:, :, 0]
    assert (held.sum(0) == LAYERS * 12 + LAYERS - 1).all()


def test_global_decode_time_ranking_keeps_the_total(model):
    cache = ComposedCache(DenseStore(), load("global_budget", when="decode", **SMALL))
    cache.setup(spec_of(model))
    cache.reset(1)
    forward_chunks(model, torch.randint(0, 97, (1, PROMPT), generator=torch.Generator().manual_seed(1)), cache, 8)
    held = counts(cache)[:, 0]
    assert int(held.sum()) == LAYERS * KV_HEADS * 12 and cache.policy.evictions > 0


def test_global_refuses_bad_settings():
    for setting, value in [("scope", "model"), ("granularity", "token"), ("floor", 2.0), ("normalize", "max")]:
        with pytest.raises(Exception, match=rf"policy\.{setting}"):
            load("global_budget", **{setting: value})


def test_pyramid_paper_schedule(model):
    pol = load("pyramid", budget=64, window=8, beta=4)
    pol.check(spec_of(model), DenseStore())
    pol.reset(1, list(range(LAYERS)))
    pol.row_seen = torch.tensor([256])
    per_layer = [pol.layer_budget(i, 64) for i in range(LAYERS)]
    assert sum(per_layer) == LAYERS * 64 and per_layer == sorted(per_layer, reverse=True)
    assert per_layer[0] == round(2 * 64 - 64 / 4) and per_layer[-1] == round(64 / 4)  # (2 - 1/beta) K .. K / beta
    pol.row_seen = torch.tensor([100])  # hi clamps to n - window = 92, lo = 2K - hi = 36
    assert [pol.layer_budget(i, 64) for i in range(LAYERS)] == [92, 73, 55, 36]
    small = [pol.layer_budget(i, 24) for i in range(LAYERS)]  # 24 / 4 < window: uniform, as kvpress
    assert small == [24] * LAYERS


def test_random_reseeded_every_layer_drops_the_same_tokens_and_keeps_sinks(model):
    cache = compressed(model, load("random", budget=12, sinks=4, when="prefill"))
    pos = [v.positions()[0] for v in cache.stores()]
    assert all(torch.equal(p, pos[0]) for p in pos[1:])
    assert all(set(range(4)) <= set(p.tolist()) for p in pos)
    other = compressed(model, load("random", budget=12, sinks=4, when="prefill", reseed=False))
    assert not all(torch.equal(v.positions()[0], pos[0]) for v in other.stores())


def test_chunkkv_whole_chunks_keeps_the_papers_chunk_count(model):
    """41 held (the prompt and this step's token, protected), chunk 4: n = 11 chunks, the last one the new token;
    budget 18 keeps k = floor(11 x 18 / 41) = 4 of them, whole: 3 x 4 + 1 = 13 tokens (kvpress's ChunkKVPress)."""
    cache = compressed(model, load("chunkkv", budget=18, chunk=4, recent=0, whole_chunks=True, when="prefill",
                                   scorer=dict(window=4)))
    assert (counts(cache)[0] == 13).all()
    for store in cache.stores():
        kept = store.positions()[0].tolist()
        assert PROMPT in kept and all(sum(p // 4 == c for p in kept) in (0, 4) for c in range(PROMPT // 4))
    exact = compressed(model, load("chunkkv", budget=18, chunk=4, recent=0, when="prefill", scorer=dict(window=4)))
    assert (counts(exact)[0] == 18).all()


def test_cam_decode_merge_leaves_a_compressed_prompt_unmerged(model):
    def values(cache):
        return cache.views[0].read()[1]

    plain = compressed(model, load("h2o", budget=12, when="prefill"))
    merged = compressed(model, load("cam", budget=12, when="prefill"))
    decode_only = compressed(model, load("cam", budget=12, when="prefill", merge="decode"))
    assert torch.equal(values(decode_only), values(plain)) and not torch.equal(values(merged), values(plain))
    with pytest.raises(Exception, match=r"policy\.merge"):
        load("cam", merge="all")


def test_criticalkv_scores_by_hand():
    """Scores 4 3 2 1, value L1 norms 1 1 10 1, first stage 1: token 0 first; then 2 (2 x 10) beats 1 (3 x 1)."""
    s = torch.tensor([[[4.0, 3, 2, 1]]])
    v = torch.tensor([1.0, 1, 10, 1]).view(1, 1, 4, 1)
    out = critical_scores(s, v, torch.arange(4).view(1, 1, 4), 1, 0.0)
    assert out[0, 0].argsort(descending=True).tolist() == [0, 2, 1, 3]
    assert out[0, 0, 1:].tolist() == [3.0, 20.0, 1.0]


def test_criticalkv_runs_in_the_engine(model):
    cache = compressed(model, load("criticalkv", budget=12, recent=4, when="prefill"))
    assert (counts(cache)[0] == 12).all() and cache.policy.evictions > 0
