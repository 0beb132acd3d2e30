"""Fixed-budget eviction in static-capacity buffers (``cache.policy.captured``): the same logits and the same tokens
held per row and layer as the eager composed cache, over prefill (whole or chunked) and decode; a single-token
step traces as one graph; the buffers hold budget + slack slots, not the capacity."""
from __future__ import annotations

import functools

import pytest
import torch

from kvcompress.cache import ComposedCache
from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.policy.cam import CaM
from kvcompress.cache.policy.captured import StaticEvictionCache
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.policy.keydiff import KeyDiff
from kvcompress.cache.policy.knorm import KeyNorm
from kvcompress.cache.policy.pyramid import PyramidKV
from kvcompress.cache.policy.random import RandomPolicy
from kvcompress.cache.policy.snapkv import SnapKV
from kvcompress.cache.policy.streaming import StreamingLLM
from kvcompress.cache.policy.tova import TOVA
from kvcompress.cache.storage.codec import CodecStore
from kvcompress.cache.storage.dense import DenseStore, StaticKVCache
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.engine.generate import positions_like
from kvcompress.engine.static import CapturedDecode, decode_step
from tests.conftest import spec_of, tiny_model

CAPACITY, PROMPT, STEPS = 24, 12, 8


@functools.cache
def model():
    return tiny_model()


def pair(policy, capacity: int = CAPACITY, storage=None):
    """(eager composed cache, its static form), both set up for the tiny model."""
    eager = ComposedCache(storage or DenseStore(), policy)
    eager.setup(spec_of(model()))
    static = eager.static_form(capacity)
    if static is not None:
        static.setup(spec_of(model()))
    return eager, static


def held(cache, layer: int) -> list[set[int]]:
    """Real positions held per row by a layer."""
    pos = cache.positions(layer) if isinstance(cache, StaticEvictionCache) else cache.views[layer].positions()
    return [{int(p) for p in row if p < PAD_POSITION} for row in pos]


def prefill(cache, tokens, chunk: int | None):
    cache.reset(tokens.shape[0])
    out = []
    for lo in range(0, tokens.shape[1], chunk or tokens.shape[1]):
        part = tokens[:, lo : lo + (chunk or tokens.shape[1])]
        out.append(model()(part, positions_like(part, lo), cache))
    return torch.cat(out, 1)


def budget_of(policy, seen: int) -> int:
    import math
    return policy.budget if isinstance(policy.budget, int) else max(1, math.ceil(policy.budget * seen))


POLICIES = {
    "h2o": lambda: H2O(budget=6),
    "h2o-frac": lambda: H2O(budget=0.5),
    "h2o-sinks-slack": lambda: H2O(budget=7, sinks=1, recent=0.25, slack=2),
    "tova": lambda: TOVA(budget=7),
    "tova-frac-recent": lambda: TOVA(budget=0.5, sinks=2, recent=3),
    "streaming": lambda: StreamingLLM(budget=8, sinks=2),
    "knorm": lambda: KeyNorm(budget=6, sinks=1, recent=2),
    "keydiff": lambda: KeyDiff(budget=7, recent=0.5),
}


class LayerScaled(CodecStore):
    """A codec whose parts depend on the layer, as calibrated ones' do: K and V times (layer + 1), in fp16. Tokens
    encoded with another layer's codec would decode scaled wrong."""

    def encode(self, k, v):
        return {"k": (k * (self.layer + 1)).half(), "v": (v * (self.layer + 1)).half()}

    def decode(self, parts, dtype):
        return parts["k"].to(dtype) / (self.layer + 1), parts["v"].to(dtype) / (self.layer + 1)


STORAGES = {"dense": DenseStore, "int4": lambda: QuantizedStore(bits=4, group_size=8), "per-layer": LayerScaled}


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("name,storage", [(n, "dense") for n in sorted(POLICIES)]
                         + [("h2o-sinks-slack", "int4"), ("tova", "int4"), ("keydiff", "int4"),
                            ("h2o-sinks-slack", "per-layer"), ("knorm", "per-layer")])
@torch.inference_mode()
def test_static_eviction_equals_the_eager_cache(name, storage, chunk):
    """Over dense, per-token int4 codes and a codec that differs per layer: every layer encodes its candidates with
    its own codec."""
    policy = POLICIES[name]()
    eager, static = pair(policy, storage=STORAGES[storage]())
    assert isinstance(static, StaticEvictionCache)
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (2, PROMPT + STEPS))
    want, got = prefill(eager, tokens[:, :PROMPT], chunk), prefill(static, tokens[:, :PROMPT], chunk)
    # codes of a deeper layer's K/V can round the other way on fp noise: int4 is compared looser (the held sets,
    # below, are exact either way)
    close = dict(atol=1e-5, rtol=1e-5) if storage != "int4" else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, **close)
    for i in range(STEPS):
        for layer in range(spec_of(model()).num_layers):
            assert held(static, layer) == held(eager, layer), (i, layer)
            for row in held(static, layer):
                assert len(row) <= budget_of(policy, PROMPT + i) + policy.slack
        tok, pos = tokens[:, PROMPT + i : PROMPT + i + 1], torch.full((2, 1), PROMPT + i)
        torch.testing.assert_close(decode_step(model(), tok, pos, static), decode_step(model(), tok, pos, eager),
                                   **close)
    assert static.tokens_seen == eager.tokens_seen == 2 * (PROMPT + STEPS)
    report, ref = static.memory_report(), eager.memory_report()
    assert report["evictions"] == ref["evictions"] > 0
    assert report["tokens_held_max"] == ref["tokens_held_max"]


@pytest.mark.parametrize("name", ["h2o-frac", "h2o-sinks-slack", "tova", "streaming", "knorm", "keydiff"])
@torch.inference_mode()
def test_static_eviction_with_a_right_padded_row(name):
    """Padding counts as held slots until evicted, as in the eager store (TOVA scores a padded row with its last
    real query, in both forms)."""
    policy = POLICIES[name]()
    eager, static = pair(policy)
    torch.manual_seed(2)
    tokens = torch.randint(0, 97, (2, PROMPT + STEPS))
    pos = torch.arange(PROMPT).repeat(2, 1)
    pos[1, 9:] = PAD_POSITION  # row 1: 9 prompt tokens, then padding
    outs = []
    for cache in (eager, static):
        cache.reset(2)
        outs.append(model()(tokens[:, :PROMPT], pos, cache))
    want, got = outs
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :9], want[1, :9], atol=1e-5, rtol=1e-5)
    for i in range(STEPS):
        tok, p = tokens[:, PROMPT + i : PROMPT + i + 1], torch.tensor([[PROMPT + i], [9 + i]])
        torch.testing.assert_close(decode_step(model(), tok, p, static), decode_step(model(), tok, p, eager),
                                   atol=1e-5, rtol=1e-5)
        for layer in range(spec_of(model()).num_layers):
            assert held(static, layer) == held(eager, layer), (i, layer)


@torch.inference_mode()
def test_static_eviction_buffers_are_the_budget_not_the_capacity():
    eager, static = pair(H2O(budget=6, slack=1))
    dense = StaticKVCache(CAPACITY)
    dense.setup(spec_of(model()))
    tokens = torch.randint(0, 97, (2, PROMPT))
    prefill(static, tokens, None)
    prefill(dense, tokens, None)
    assert static.kv_bytes() == sum(t.nbytes for t in static.tensors())
    for layer in range(spec_of(model()).num_layers):
        parts = static.main.slots.view(layer).values()
        assert {part.shape[2] for part in parts} == {6 + 1 + 1 + 1}  # budget + slack + trash + stage
    assert static.kv_bytes() < dense.kv_bytes() / 2
    addresses = [t.data_ptr() for t in static.tensors()]
    static.reset(2)  # same batch: cleared in place
    assert [t.data_ptr() for t in static.tensors()] == addresses
    assert int(static.held) == 0 and bool((static.pos == PAD_POSITION).all())


@pytest.mark.parametrize("name,storage", [("h2o-sinks-slack", "dense"), ("tova-frac-recent", "dense"),
                                          ("keydiff", "dense"), ("h2o-sinks-slack", "int4")])
@torch.inference_mode()
def test_traced_decode_step_is_one_graph_and_equals_eager(name, storage):
    """fullgraph=True fails on any graph break or host sync: what a CUDA graph cannot record (int4: the codec's
    packed attention over the slots)."""
    torch._dynamo.reset()
    tokens = torch.randint(0, 97, (2, PROMPT + 4))
    _, plain = pair(POLICIES[name](), storage=STORAGES[storage]())
    _, traced = pair(POLICIES[name](), storage=STORAGES[storage]())
    prefill(plain, tokens[:, :PROMPT], None)
    prefill(traced, tokens[:, :PROMPT], None)
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    for i in range(4):
        tok, pos = tokens[:, PROMPT + i : PROMPT + i + 1], torch.full((2, 1), PROMPT + i)
        assert torch.equal(compiled(model(), tok, pos, traced), decode_step(model(), tok, pos, plain))
    for x, y in zip(traced.tensors(), plain.tensors(), strict=True):
        assert torch.equal(x, y)


@torch.inference_mode()
def test_captured_decode_runs_it_eagerly_off_cuda():
    eager, static = pair(H2O(budget=0.5, sinks=1))
    tokens = torch.randint(0, 97, (2, PROMPT + 4))
    static.reset(2)
    step = CapturedDecode(model(), static, 2)  # as eval.speed builds it: before the prefill
    assert not step.captured
    prefill(eager, tokens[:, :PROMPT], 4)
    prefill(static, tokens[:, :PROMPT], 4)
    for i in range(4):
        tok, pos = tokens[:, PROMPT + i : PROMPT + i + 1], torch.full((2, 1), PROMPT + i)
        torch.testing.assert_close(step(tok, pos), decode_step(model(), tok, pos, eager), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs CUDA")
@torch.inference_mode()
def test_cuda_graph_replay_equals_eager():
    """Captured before the prefill (the first step allocates), as ``eval.speed`` does."""
    net = model().cuda()
    tokens = torch.randint(0, 97, (2, PROMPT + 6), device="cuda")
    eager, static = pair(H2O(budget=0.5, sinks=1, recent=2))
    static.reset(2)
    step = CapturedDecode(net, static, 2)
    assert step.captured
    for cache in (eager, static):
        cache.reset(2)
        net(tokens[:, :PROMPT], positions_like(tokens[:, :PROMPT]), cache)
    for i in range(6):
        tok, pos = tokens[:, PROMPT + i : PROMPT + i + 1], torch.full((2, 1), PROMPT + i, device="cuda")
        torch.testing.assert_close(step(tok, pos), decode_step(net, tok, pos, eager), atol=1e-5, rtol=1e-5)
    for layer in range(spec_of(net).num_layers):
        assert held(static, layer) == held(eager, layer)


def test_unsupported_combinations_decode_eagerly():
    spec = spec_of(model())

    def form(policy, storage=None, layout=None, capacity=CAPACITY):
        cache = ComposedCache(storage, policy, layout)
        cache.setup(spec)
        return cache.static_form(capacity)

    assert form(H2O(budget=6, per_head=True)) is None
    assert form(H2O(budget=6, when="both")) is None
    assert form(SnapKV(budget=6, when="prefill")) is None  # compresses once at prefill end: not yet
    assert form(RandomPolicy(budget=6)) is None  # a host generator draws its scores
    assert form(CaM(budget=6)) is None  # merges what it evicts
    assert form(PyramidKV(budget=6, when="decode")) is None  # a budget per layer
    assert form(StreamingLLM(budget=6, rerotate=True), DenseStore(keys="pre_rope")) is None
    kivi = QuantizedStore(bits=2, group_size=4, key_axis="channel", residual=4)
    assert form(H2O(budget=6), kivi) is None  # a residual placed by its own count: not slot-addressable
    assert type(form(H2O(budget=6), QuantizedStore(bits=4, group_size=8))) is StaticEvictionCache
    assert form(H2O(budget=6), layout=CLA(group_size=2)) is None
    assert type(form(H2O(budget=24))) is StaticKVCache  # nothing is evicted within the capacity
    assert type(form(H2O(budget=6))) is StaticEvictionCache


def test_speed_on_the_static_path_keeps_the_perplexity(stories):
    from kvcompress.eval.base import EvalContext
    from kvcompress.eval.data import default_data_dir
    from kvcompress.eval.speed import Speed

    net, tok = stories
    spec = net.config.spec()
    out = {}
    for path in ("eager", "graph"):
        cache = ComposedCache(policy=H2O(budget=0.25, sinks=1))
        cache.setup(spec)
        ev = Speed(context=32, decode_tokens=6, repeats=1, prefill_chunk=8, dataset="tinystories", decode_path=path)
        ev.check(spec, default_data_dir())
        out[path] = ev.run(EvalContext(net, tok, cache, default_data_dir(), progress=False))
    assert out["graph"]["decode_path"] == "static"  # no CUDA graph on CPU: the static step, run eagerly
    assert abs(out["graph"]["ppl"] - out["eager"]["ppl"]) < 1e-5 * out["eager"]["ppl"]
    assert out["graph"]["kv_bytes"] < out["eager"]["kv_bytes_fp16"]
