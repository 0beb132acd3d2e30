"""Token eviction: budgets, positions, per-row and per-head selection, accounting, H2O brute force."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import spec_of, tiny_model

from kvcompress.cache import FullCache
from kvcompress.cache.evict import POLICIES, H2OCache, PyramidCache, StreamingCache
from kvcompress.cache.store import DenseStore, register_storage
from kvcompress.engine.generate import forward_chunks, generate

NEEDS_WEIGHTS = {"h2o", "snapkv", "tova", "pyramid"}


def make(cls, model, batch=1, **kw):
    c = cls(**kw)
    c.setup(spec_of(model))
    c.reset(batch)
    return c


def tokens(batch=2, n=64, seed=0, vocab=97):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def run(model, toks, cache, chunk, check=None):
    cache.reset(toks.shape[0])
    return forward_chunks(model, toks, cache, chunk, on_chunk=check)


def layer_positions(cache, layer):
    return cache.store_for(layer).positions()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and a shared CPU thrashes with more); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("kw", [
    dict(budget=0), dict(budget=-3), dict(budget=1.5), dict(budget=0.0), dict(budget=True), dict(budget="64"),
    dict(budget=8, sinks=8), dict(budget=8, sinks=9), dict(budget=8, sinks=-1), dict(budget=8, sinks=2, recent=7),
    dict(budget=8, recent=1.5), dict(budget=8, when="always"), dict(budget=8, slack=-1),
    dict(budget=8, storage="nope"),
])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_bad_input_raises_in_constructor(name, kw):
    if name == "streaming" and "sinks" not in kw:
        kw = {**kw, "sinks": 0}  # streaming's default sinks=4 would mask the setting under test
    with pytest.raises(ValueError, match=r"budget|sinks|recent|when|slack|storage"):
        POLICIES[name](**kw)


def test_bad_policy_settings():
    from kvcompress.cache.evict import SnapKVCache

    for kw in (dict(window=0), dict(kernel=4), dict(pooling="median")):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SnapKVCache(budget=64, **kw)
    with pytest.raises(ValueError, match="beta"):
        PyramidCache(budget=64, beta=0.5)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [10_000, 1.0])
def test_budget_beyond_sequence_equals_full(model, name, budget):
    if name == "pyramid" and budget == 1.0:
        pytest.skip("pyramid moves budget between layers: a 100% mean leaves deep layers below 100%")
    toks = tokens()
    full = make(FullCache, model, 2)
    ref = run(model, toks, full, 5)
    for chunk in (1, 5):
        cache = make(POLICIES[name], model, 2, budget=budget)
        out = run(model, toks, cache, chunk)
        assert cache.evictions == 0 and cache.tokens_held() == [64] * 3
        if name in NEEDS_WEIGHTS:  # weights come from an explicit softmax instead of SDPA: rounding only
            torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
        else:
            assert torch.equal(out, run(model, toks, full, chunk))


@pytest.mark.parametrize("chunk,slack", [(1, 0), (7, 0), (1, 5), (3, 4)])
def test_streaming_keeps_exactly_sinks_and_last_window(model, chunk, slack):
    sinks, budget = 4, 20
    cache = make(StreamingCache, model, 2, budget=budget, sinks=sinks, slack=slack)

    def check(logits, lo, hi):
        for layer in range(3):
            pos = layer_positions(cache, layer)
            held = pos.shape[-1]
            assert held <= budget + slack
            expected = list(range(min(sinks, hi))) + list(range(max(sinks, hi - (held - sinks)), hi))
            assert pos.tolist() == [expected] * 2

    run(model, tokens(), cache, chunk, check)
    assert cache.evictions > 0


def brute_force_h2o(q, k, budget, recent, sinks, slack):
    """Kept positions of one row and layer by naive loops: q[t] (Hq, D), k[t] (Hkv, D) per step."""
    hq, hkv, d = q[0].shape[0], k[0].shape[0], q[0].shape[1]
    kept, acc = [], {}
    for t in range(len(q)):
        kept.append(t)
        acc[t] = 0.0
        for h in range(hq):
            logits = [float(q[t][h].double() @ k[j][h // (hq // hkv)].double()) / math.sqrt(d) for j in kept]
            top = max(logits)
            z = sum(math.exp(x - top) for x in logits)
            for j, x in zip(kept, logits, strict=True):
                acc[j] += math.exp(x - top) / z
        if len(kept) > budget + slack:
            protected = set(sorted(kept)[:sinks]) | set(sorted(kept)[len(kept) - recent:] if recent else [])
            candidates = sorted((j for j in kept if j not in protected), key=lambda j: acc[j])
            drop = set(candidates[: len(kept) - budget])
            kept = [j for j in kept if j not in drop]
    return sorted(kept)


class Recording(H2OCache):
    """H2O that records each layer's rotated keys (per token) and queries (per step)."""

    def reset(self, batch_size):
        super().reset(batch_size)
        self.rec_keys = [[] for _ in range(self.spec.num_layers)]
        self.queries = [[] for _ in range(self.spec.num_layers)]

    def append(self, layer, k, v, pos, rope):
        self.rec_keys[layer].append(rope.rotate(k, pos)[0, :, 0])
        super().append(layer, k, v, pos, rope)

    def attend(self, layer, q, q_pos):
        self.queries[layer].append(q[0, :, 0])
        return super().attend(layer, q, q_pos)


@pytest.mark.parametrize("recent,sinks,slack", [(0, 0, 0), (4, 2, 0), (3, 0, 3)])
def test_h2o_kept_set_matches_brute_force(stories, story_tokens, recent, sinks, slack):
    model = stories[0]
    budget = 12
    cache = make(Recording, model, 1, budget=budget, recent=recent, sinks=sinks, slack=slack)
    run(model, story_tokens[:, :48], cache, 1)
    assert cache.evictions > 0
    for layer in range(model.config.num_layers):
        want = brute_force_h2o(cache.queries[layer], cache.rec_keys[layer], budget, recent, sinks, slack)
        assert layer_positions(cache, layer)[0].tolist() == want, f"layer {layer}"


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("per_head", [False, True])
def test_positions_are_original_and_keys_match_full(model, name, per_head):
    toks = tokens()
    full = make(FullCache, model, 2)
    run(model, toks, full, 4)
    cache = make(POLICIES[name], model, 2, budget=16, per_head=per_head)
    run(model, toks, cache, 4)
    assert cache.evictions > 0
    for layer in range(3):
        pos = layer_positions(cache, layer)
        assert pos.shape == ((2, 2, 16) if per_head else (2, 16))
        assert ((pos >= 0) & (pos < 64)).all() and (pos.diff(dim=-1) > 0).all()  # original, in order
    # layer 0 sees the same inputs with or without eviction: the kept keys are the full cache's
    k_full, v_full, _ = full.store_for(0).read()
    k, v, pos = cache.store_for(0).read()
    idx = pos.long() if per_head else pos.long()[:, None].expand(-1, 2, -1)
    gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(k, k_full.gather(2, gather)) and torch.equal(v, v_full.gather(2, gather))


@pytest.mark.parametrize("name", ["h2o", "tova", "knorm", "snapkv"])
@pytest.mark.parametrize("per_head", [False, True])
def test_rows_select_independently(stories, name, per_head):
    model = stories[0]
    toks = tokens(2, 48, seed=1, vocab=512)
    kw = dict(budget=12, per_head=per_head, **({"window": 4} if name == "snapkv" else {}))
    both = make(POLICIES[name], model, 2, **kw)
    run(model, toks, both, 3)
    for row in range(2):
        alone = make(POLICIES[name], model, 1, **kw)
        run(model, toks[row : row + 1], alone, 3)
        for layer in range(model.config.num_layers):
            assert torch.equal(layer_positions(both, layer)[row], layer_positions(alone, layer)[0])
    assert any(not torch.equal(*layer_positions(both, layer)) for layer in range(model.config.num_layers))


def test_per_head_heads_keep_different_tokens(stories):
    model = stories[0]
    cache = make(POLICIES["knorm"], model, 1, budget=12, per_head=True)
    run(model, tokens(1, 48, vocab=512), cache, 4)
    pos = layer_positions(cache, 2)[0]
    assert pos.shape == (4, 12) and len({tuple(p.tolist()) for p in pos}) > 1


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget,slack,chunk", [(16, 0, 1), (16, 5, 1), (10, 3, 4), (0.3, 0, 1), (0.25, 4, 3)])
def test_bytes_exact_and_held_within_budget_plus_slack(model, name, budget, slack, chunk):
    cache = make(POLICIES[name], model, 2, budget=budget, slack=slack)

    def check(logits, lo, hi):
        target = budget if isinstance(budget, int) else max(1, math.ceil(budget * hi))
        for layer in range(3):
            assert cache.store_for(layer).length <= cache.layer_budget(layer, target) + slack
        arrays = [t for s in cache.stores for t in s.tensors()] + cache.policy_tensors()
        assert cache.kv_bytes() == sum(t.numel() * t.element_size() for t in arrays)
        assert cache.tokens_seen == 2 * hi

    run(model, tokens(n=48), cache, chunk, check)
    assert cache.evictions > 0
    report = cache.memory_report()
    assert report["kv_bytes_fp16"] == 2 * 48 * spec_of(model).fp16_bytes_per_token()


def test_pyramid_schedule_sums_to_layers_times_budget(model):
    cache = make(PyramidCache, model, 1, budget=64, window=8)
    per_layer = [cache.layer_budget(i, 64) for i in range(3)]
    assert sum(per_layer) == 3 * 64 and per_layer[0] > per_layer[1] > per_layer[2] >= 8
    run(model, tokens(1, 200), cache, 8)
    assert cache.tokens_held() == per_layer


@pytest.mark.parametrize("when", ["prefill", "both", "decode"])
def test_when_prefill_end_and_decode(model, when):
    prompt = tokens(1, 40)[0].tolist()
    cache = make(POLICIES["h2o"], model, 1, budget=16, when=when)
    held = []
    generate(model, [prompt], cache, 6, chunk=8, on_token=lambda step: held.append(cache.tokens_held()[0]))
    if when == "prefill":  # compressed before the first decode step attends, then grows
        assert held == [16, 17, 18, 19, 20]
    else:
        assert held == [16] * 5
    if when == "decode":  # chunked prefill already evicted: the prompt never sat in memory whole
        cache.reset(1)
        forward_chunks(model, torch.tensor([prompt]), cache, 8)
        assert cache.tokens_held()[0] == 16


def test_eviction_over_another_storage(model):
    @register_storage("_test_half")
    class HalfStore(DenseStore):  # stands in for a quantized storage: a different dtype underneath
        def append(self, k, v, pos):
            super().append(k.half(), v.half(), pos)

    cache = make(POLICIES["h2o"], model, 2, budget=16, storage="_test_half", per_head=True)
    run(model, tokens(), cache, 4)
    assert cache.store_for(0).read()[0].dtype == torch.float16 and cache.tokens_held() == [16] * 3


def test_streaming_rerotate_is_explicit(model):
    toks = tokens()
    plain = make(StreamingCache, model, 2, budget=10_000)
    rerot = make(StreamingCache, model, 2, budget=10_000, rerotate=True)
    torch.testing.assert_close(run(model, toks, rerot, 4), run(model, toks, plain, 4), rtol=0, atol=1e-5)
    small = [make(StreamingCache, model, 2, budget=16, rerotate=r) for r in (False, True)]
    a, b = (run(model, toks, c, 4) for c in small)
    assert not torch.allclose(a, b)  # positions really shift with rerotate ...
    assert torch.equal(layer_positions(small[0], 1), layer_positions(small[1], 1))  # ... stored ones don't


@pytest.mark.parametrize("name,needed", [("h2o", 4), ("snapkv", 2), ("tova", 1), ("knorm", 0)])
def test_weights_come_from_the_one_attention_pass(model, monkeypatch, name, needed):
    """Every query row goes through attention exactly once; only the rows a policy needs give weights."""
    from kvcompress.cache.evict import base

    rows = {"plain": 0, "weights": 0}

    def counted(fn, kind):
        def wrapper(q, *args):
            rows[kind] += q.shape[2]
            return fn(q, *args)
        return wrapper

    monkeypatch.setattr(base, "attention", counted(base.attention, "plain"))
    monkeypatch.setattr(base, "attention_with_weights", counted(base.attention_with_weights, "weights"))
    kw = {"window": 2} if name == "snapkv" else {}
    cache = make(POLICIES[name], model, 2, budget=8, **kw)
    run(model, tokens(n=32), cache, 4)
    steps = 3 * 32 // 4  # layers x chunks
    assert rows["weights"] == steps * needed and rows["plain"] + rows["weights"] == steps * 4
