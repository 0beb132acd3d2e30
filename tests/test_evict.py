"""Token eviction (the policy axis): budgets, positions, per-row and per-head selection, accounting, H2O brute
force, eviction over another storage, rerotation, and the one attention pass that gives the weights."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import compose, spec_of, tiny_model

from kvcompress.cache import ComposedCache, DenseStore, TokenStore
from kvcompress.cache.buffers import GrowingBuffer, gather_tokens
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.policy.knorm import KeyNorm
from kvcompress.cache.policy.pyramid import PyramidKV
from kvcompress.cache.policy.random import RandomPolicy
from kvcompress.cache.policy.snapkv import SnapKV
from kvcompress.cache.policy.streaming import StreamingLLM
from kvcompress.cache.policy.tova import TOVA
from kvcompress.engine.generate import forward_chunks, generate

POLICIES = {"streaming": StreamingLLM, "h2o": H2O, "snapkv": SnapKV, "tova": TOVA, "knorm": KeyNorm,
            "random": RandomPolicy, "pyramid": PyramidKV}
NEEDS_WEIGHTS = {"h2o", "snapkv", "tova", "pyramid"}


def make(model, name, batch=1, storage=None, **kw):
    """A per-layer cache evicting with policy ``name`` (a key of POLICIES) over ``storage`` (dense by default)."""
    return compose(model, storage=storage, policy=POLICIES[name](**kw), batch=batch)


def full(model, batch=1):
    return compose(model, batch=batch)


def tokens(batch=2, n=64, seed=0, vocab=97):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def run(model, toks, cache, chunk, check=None):
    cache.reset(toks.shape[0])
    return forward_chunks(model, toks, cache, chunk, on_chunk=check)


def layer_positions(cache, layer):
    return cache.views[layer].positions()


def held(cache):
    """Token slots each layer's store holds (per row)."""
    return [view.length for view in cache.views]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("kw", [
    dict(budget=0), dict(budget=-3), dict(budget=1.5), dict(budget=0.0), dict(budget=True), dict(budget="64"),
    dict(budget=8, sinks=8), dict(budget=8, sinks=9), dict(budget=8, sinks=-1), dict(budget=8, sinks=2, recent=7),
    dict(budget=8, recent=1.5), dict(budget=8, when="always"), dict(budget=8, slack=-1),
])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_bad_input_raises_in_constructor(name, kw):
    if name == "streaming" and "sinks" not in kw:
        kw = {**kw, "sinks": 0}  # streaming's default sinks=4 would mask the setting under test
    with pytest.raises(ValueError, match=r"policy\.(budget|sinks|recent|when|slack)"):
        POLICIES[name](**kw)


def test_bad_storage_and_combinations_are_refused(model):
    """The storage is its own axis now: its settings fail in its constructor, and a policy option the storage
    cannot serve fails in ``setup`` (before any weights load), naming the setting."""
    with pytest.raises(ValueError, match="storage.keys"):
        DenseStore(keys="nope")
    with pytest.raises(ValueError, match="rerotate.*storage.keys=pre_rope"):
        ComposedCache(DenseStore(), StreamingLLM(budget=8, rerotate=True)).setup(spec_of(model))

    class OneSelection(HalfStore):
        ragged_heads = False

    with pytest.raises(ValueError, match="per_head"):
        ComposedCache(OneSelection(), H2O(budget=8, per_head=True)).setup(spec_of(model))


def test_bad_policy_settings():
    for kw in (dict(window=0), dict(kernel=4), dict(pooling="median")):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SnapKV(budget=64, **kw)
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(budget=64, beta=0.5)
    with pytest.raises(ValueError, match="seed"):
        RandomPolicy(budget=64, seed="0")


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [10_000, 1.0])
def test_budget_beyond_sequence_equals_full(model, name, budget):
    if name == "pyramid" and budget == 1.0:
        pytest.skip("pyramid moves budget between layers: a 100% mean leaves deep layers below 100%")
    toks = tokens()
    ref = run(model, toks, full(model, 2), 5)
    for chunk in (1, 5):
        cache = make(model, name, 2, budget=budget)
        out = run(model, toks, cache, chunk)
        assert cache.policy.evictions == 0 and held(cache) == [64] * 3
        report = cache.memory_report()
        assert report["evictions"] == 0 and report["tokens_held_mean"] == report["tokens_held_max"] == 64
        if name in NEEDS_WEIGHTS and budget == 1.0:  # weights from an explicit softmax instead of SDPA: rounding
            torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
        else:  # no eviction possible (10_000 > max_position): no weights are even computed, exactly the full cache
            assert torch.equal(out, run(model, toks, full(model, 2), chunk))


@pytest.mark.parametrize("chunk,slack", [(1, 0), (7, 0), (1, 5), (3, 4)])
def test_streaming_keeps_exactly_sinks_and_last_window(model, chunk, slack):
    sinks, budget = 4, 20
    cache = make(model, "streaming", 2, budget=budget, sinks=sinks, slack=slack)

    def check(logits, lo, hi):
        for layer in range(3):
            pos = layer_positions(cache, layer)
            n = pos.shape[-1]
            assert n <= budget + slack
            expected = list(range(min(sinks, hi))) + list(range(max(sinks, hi - (n - sinks)), hi))
            assert pos.tolist() == [expected] * 2

    run(model, tokens(), cache, chunk, check)
    assert cache.policy.evictions > 0


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


class Recording(ComposedCache):
    """A composed cache that records each layer's rotated keys (per token) and queries (per step)."""

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
    cache = Recording(DenseStore(), H2O(budget=budget, recent=recent, sinks=sinks, slack=slack))
    cache.setup(spec_of(model))
    run(model, story_tokens[:, :48], cache, 1)
    assert cache.policy.evictions > 0
    for layer in range(model.config.num_layers):
        want = brute_force_h2o(cache.queries[layer], cache.rec_keys[layer], budget, recent, sinks, slack)
        assert layer_positions(cache, layer)[0].tolist() == want, f"layer {layer}"


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("per_head", [False, True])
def test_positions_are_original_and_keys_match_full(model, name, per_head):
    toks = tokens()
    reference = full(model, 2)
    run(model, toks, reference, 4)
    cache = make(model, name, 2, budget=16, per_head=per_head)
    run(model, toks, cache, 4)
    assert cache.policy.evictions > 0
    for layer in range(3):
        pos = layer_positions(cache, layer)
        assert pos.shape == ((2, 2, 16) if per_head else (2, 16))
        assert ((pos >= 0) & (pos < 64)).all() and (pos.diff(dim=-1) > 0).all()  # original, in order
    # layer 0 sees the same inputs with or without eviction: the kept keys are the full cache's
    k_full, v_full, _ = reference.views[0].read()
    k, v, pos = cache.views[0].read()
    idx = pos.long() if per_head else pos.long()[:, None].expand(-1, 2, -1)
    gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(k, k_full.gather(2, gather)) and torch.equal(v, v_full.gather(2, gather))


@pytest.mark.parametrize("name", ["h2o", "tova", "knorm", "snapkv"])
@pytest.mark.parametrize("per_head", [False, True])
def test_rows_select_independently(stories, name, per_head):
    model = stories[0]
    toks = tokens(2, 48, seed=1, vocab=512)
    kw = dict(budget=12, per_head=per_head, **({"window": 4} if name == "snapkv" else {}))
    both = make(model, name, 2, **kw)
    run(model, toks, both, 3)
    for row in range(2):
        alone = make(model, name, 1, **kw)
        run(model, toks[row : row + 1], alone, 3)
        for layer in range(model.config.num_layers):
            assert torch.equal(layer_positions(both, layer)[row], layer_positions(alone, layer)[0])
    assert any(not torch.equal(*layer_positions(both, layer)) for layer in range(model.config.num_layers))


def test_per_head_heads_keep_different_tokens(stories):
    model = stories[0]
    cache = make(model, "knorm", 1, budget=12, per_head=True)
    run(model, tokens(1, 48, vocab=512), cache, 4)
    pos = layer_positions(cache, 2)[0]
    assert pos.shape == (4, 12) and len({tuple(p.tolist()) for p in pos}) > 1


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget,slack,chunk", [(16, 0, 1), (16, 5, 1), (10, 3, 4), (0.3, 0, 1), (0.25, 4, 3)])
def test_bytes_exact_and_held_within_budget_plus_slack(model, name, budget, slack, chunk):
    cache = make(model, name, 2, budget=budget, slack=slack)

    def check(logits, lo, hi):
        target = budget if isinstance(budget, int) else max(1, math.ceil(budget * hi))
        for layer in range(3):
            assert cache.views[layer].length <= cache.policy.layer_budget(layer, target) + slack
        arrays = [t for s in cache.stores() for t in s.tensors()] + cache.policy.tensors()
        assert cache.kv_bytes() == sum(t.numel() * t.element_size() for t in arrays)
        assert cache.tokens_seen == 2 * hi

    run(model, tokens(n=48), cache, chunk, check)
    assert cache.policy.evictions > 0
    report = cache.memory_report()
    assert report["kv_bytes_fp16"] == 2 * 48 * spec_of(model).fp16_bytes_per_token()
    assert report["evictions"] == cache.policy.evictions and report["tokens_held_max"] == max(held(cache))
    assert report["kv_bytes"] <= report["kv_bytes_allocated"]


def test_eviction_frees_the_allocation(model):
    """After eviction the buffers are re-allocated near what is held (1.5x), not kept at their peak size."""
    toks = tokens(n=64)
    everything, evicting = full(model, 2), make(model, "streaming", 2, budget=16)
    run(model, toks, everything, 64)  # one prefill of 64 tokens: buffers of exactly 64 slots
    run(model, toks, evicting, 64)  # the same prefill, then evicted down to 16
    for view in evicting.stores():
        assert view.length == 16 and all(t.shape[2] <= 24 for t in view.reserved_tensors())
    assert evicting.kv_bytes_allocated() <= 1.5 * evicting.kv_bytes() < everything.kv_bytes_allocated() / 2


def test_pyramid_schedule_sums_to_layers_times_budget(model):
    cache = make(model, "pyramid", 1, budget=64, window=8, schedule="free")  # paper: tests/test_budgets.py
    per_layer = [cache.policy.layer_budget(i, 64) for i in range(3)]
    assert sum(per_layer) == 3 * 64 and per_layer[0] > per_layer[1] > per_layer[2] >= 8
    run(model, tokens(1, 200), cache, 8)
    assert held(cache) == per_layer


@pytest.mark.parametrize("when", ["prefill", "both", "decode"])
def test_when_prefill_end_and_decode(model, when):
    prompt = tokens(1, 40)[0].tolist()
    cache = make(model, "h2o", 1, budget=16, when=when)
    lengths = []
    generate(model, [prompt], cache, 6, chunk=8, on_token=lambda step: lengths.append(held(cache)[0]))
    if when == "prefill":  # compressed before the first decode step attends, then grows
        assert lengths == [16, 17, 18, 19, 20]
    else:
        assert lengths == [16] * 5
    if when == "decode":  # chunked prefill already evicted: the prompt never sat in memory whole
        cache.reset(1)
        forward_chunks(model, torch.tensor([prompt]), cache, 8)
        assert held(cache)[0] == 16


class HalfStore(TokenStore):
    """A custom storage through the payload hooks: K/V in float16 (stands in for a quantized storage)."""

    def clear_payload(self):
        self.k, self.v = GrowingBuffer(), GrowingBuffer()

    def append_payload(self, k, v, pos):
        self.k.append(k.half())
        self.v.append(v.half())

    def read_payload(self):
        return self.k.view(), self.v.view()

    def keep_payload(self, idx):
        self.k.replace(gather_tokens(self.k.view(), idx))
        self.v.replace(gather_tokens(self.v.view(), idx))

    def payload_tensors(self):
        return self.k.tensors() + self.v.tensors()


def test_eviction_over_another_storage(model):
    toks = tokens()
    cache = make(model, "h2o", 2, storage=HalfStore(), budget=16, per_head=True)
    out = run(model, toks, cache, 4)
    assert cache.views[0].read()[0].dtype == torch.float16 and held(cache) == [16] * 3
    assert cache.policy.evictions > 0 and cache.views[0].positions().shape == (2, 2, 16)
    dense = make(model, "h2o", 2, budget=16, per_head=True)
    ref = run(model, toks, dense, 4)
    assert cache.kv_bytes() < dense.kv_bytes() and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # fp16 K/V: close to the same policy over dense


def test_streaming_rerotate_is_explicit(model):
    toks = tokens()
    pre = lambda: DenseStore(keys="pre_rope")  # rerotation needs keys stored before RoPE
    plain = make(model, "streaming", 2, budget=10_000)
    rerot = make(model, "streaming", 2, storage=pre(), budget=10_000, rerotate=True)
    torch.testing.assert_close(run(model, toks, rerot, 4), run(model, toks, plain, 4), rtol=0, atol=1e-5)
    small = [make(model, "streaming", 2, storage=pre() if r else None, budget=16, rerotate=r) for r in (False, True)]
    a, b = (run(model, toks, c, 4) for c in small)
    assert not torch.allclose(a, b)  # positions really shift with rerotate ...
    assert torch.equal(layer_positions(small[0], 1), layer_positions(small[1], 1))  # ... stored ones don't


@pytest.mark.parametrize("name,needed", [("h2o", 4), ("snapkv", 2), ("tova", 4), ("knorm", 0)])
def test_weights_come_from_the_one_attention_pass(model, monkeypatch, name, needed):
    """Every query row goes through attention exactly once, whether or not a policy observes it; only the rows a
    policy needs give weights, computed beside the output (TOVA: every row of a multi-token step, to find each batch
    row's last real query)."""
    from kvcompress.cache import base

    rows = {"plain": 0, "weights": 0}

    def counted(fn, kind):
        def wrapper(q, *args):
            rows[kind] += q.shape[2]
            return fn(q, *args)
        return wrapper

    monkeypatch.setattr(base, "attention", counted(base.attention, "plain"))
    monkeypatch.setattr(base, "attention_weights", counted(base.attention_weights, "weights"))
    kw = {"window": 2} if name == "snapkv" else {}
    cache = make(model, name, 2, budget=8, **kw)
    run(model, tokens(n=32), cache, 4)
    steps = 3 * 32 // 4  # layers x chunks
    assert rows["weights"] == steps * needed and rows["plain"] == steps * 4
