"""The captured form of the latent storage (``LatentStore.static_form``: the latent codec in ``FixedSlotCache``): equal
to the eager latent store over prefill and decode for its settings (quantized latents included), the decode step
traces as one graph, exact accounting (less than the dense static cache), eviction has no captured form over it
(projections per layer), and the latent kernel reads a device-side token count.

``TRITON_INTERPRET=1`` only takes effect before triton is first imported; when something imported it first, the
interpreter tests run in a subprocess of this file (as in tests/test_kernels.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if "triton" not in sys.modules and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvcompress import kernels  # noqa: E402
from kvcompress.cache import ComposedCache, FullCache  # noqa: E402
from kvcompress.cache.policy.captured import StaticEvictionCache  # noqa: E402
from kvcompress.cache.policy.h2o import H2O  # noqa: E402
from kvcompress.cache.storage.dense import StaticKVCache  # noqa: E402
from kvcompress.cache.storage.fixed import FixedSlotCache  # noqa: E402
from kvcompress.cache.storage.latent.store import LatentStore  # noqa: E402
from kvcompress.engine.generate import positions_like  # noqa: E402
from kvcompress.engine.static import decode_step, static_form  # noqa: E402
from tests.conftest import (  # noqa: E402
    assert_graph_replay_equals_eager,
    greedy_steps,
    spec_of,
    static_prefill,
    tiny_model,
    triton_interpreted,
    triton_tests_in_a_subprocess,
)

INTERP = triton_interpreted()
interpreter = pytest.mark.skipif(not INTERP, reason="needs triton under TRITON_INTERPRET=1 (see the subprocess test)")


class Recorder(FullCache):
    """The full cache, keeping every layer's pre-RoPE keys, values and positions (calibration samples)."""

    def reset(self, batch_size):
        super().reset(batch_size)
        self.samples = [None] * self.spec.num_layers

    def append(self, layer, k, v, pos, rope):
        self.samples[layer] = (k.clone(), v.clone(), pos.clone())
        super().append(layer, k, v, pos, rope)


class TinyCalibration:
    """A calibration context: the tiny model's own K/V on 96 random tokens."""

    def __init__(self, model, tmp):
        self.model, self.cache_dir, self.key, self.progress = model, str(tmp), "tiny-static", False
        self.rope = model.rope

    def kv_samples(self):
        rec = Recorder()
        rec.setup(spec_of(self.model))
        rec.reset(1)
        tokens = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            self.model(tokens, positions_like(tokens), rec)
        return rec.samples


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ctx(model, tmp_path_factory):
    return TinyCalibration(model, tmp_path_factory.mktemp("calib"))


def eager_cache(model, ctx, policy=None, **kw) -> ComposedCache:
    cache = ComposedCache(LatentStore(**kw), policy)
    cache.setup(spec_of(model))
    cache.calibrate(ctx)
    return cache


prefill, steps = static_prefill, greedy_steps


SETTINGS = [
    dict(),  # the YAML defaults: separate K/V latents across heads, keys pre-RoPE, rank_fraction 0.5
    dict(absorb=True),  # values absorbed, pre-RoPE keys reconstructed and rotated
    dict(keys="post_rope", absorb=True),  # the fused kernel (its reference on CPU)
    dict(keys="post_rope", per_head=True, joint_kv=True, absorb=True),  # fused, one latent per head
    # fp32 latents: with fp16 ones this setting's logits move by ~1e-5 when a layer's input moves by 1e-7 (an fp16
    # rounding flips); the eager store differs from itself that much between two prefill chunkings
    dict(per_head=True, rope_dims=4, rope_select="low", latent_dtype="float32"),
    dict(per_head=True, rope_dims=4, absorb=True),
    dict(joint_kv=True, rope_dims=2, nope=True, absorb=True),  # keys absorbed, rope dims attend as they are
    dict(joint_kv=True, rank="auto", energy=0.9, latent_dtype="model"),  # ranks per layer, latents unrounded
    dict(latent_bits=8, rope_dims=2),  # quantized latents, reconstructed
    dict(keys="post_rope", absorb=True, latent_bits=4),  # quantized latents read packed by the fused kernel
    dict(latent_bits=2, latent_group_size=4, per_head=True, joint_kv=True, rope_dims=4, nope=True, absorb=True),
]


def name(kw: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "defaults"


@pytest.mark.parametrize("kw", SETTINGS, ids=name)
@torch.inference_mode()
def test_static_form_equals_the_eager_latent_store(model, ctx, kw):
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    eager = eager_cache(model, ctx, **kw)
    static = static_form(eager, 20)
    assert isinstance(static, FixedSlotCache)
    a, b = prefill(model, eager, tokens), prefill(model, static, tokens)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    nxt = a[:, -1:].argmax(-1)
    torch.testing.assert_close(steps(model, static, nxt, 12, 5), steps(model, eager, nxt, 12, 5), atol=1e-5,
                               rtol=1e-5)
    assert static.tokens_seen == eager.tokens_seen == 2 * 17 and int(static.index) == 17
    # the calibrated projections are the store's, shared (not refitted, not copied into the static form)
    assert all(x is y for x, y in zip(static.calibration_tensors(), eager.calibration_tensors(), strict=True))


@pytest.mark.parametrize("kw", [dict(), dict(keys="post_rope", absorb=True), dict(per_head=True, rope_dims=4,
                                                                                   absorb=True)], ids=name)
@torch.inference_mode()
def test_decode_step_traces_as_one_graph_and_equals_eager(model, ctx, kw):
    """fullgraph=True fails on any graph break or data-dependent branch: what a CUDA graph cannot record."""
    torch._dynamo.reset()
    tokens = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    store = eager_cache(model, ctx, **kw).storage
    eager, traced = store.static_form(16), store.static_form(16)
    prefill(model, eager, tokens)
    nxt = prefill(model, traced, tokens)[:, -1:].argmax(-1)
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    # traced, the fixed slots attend over the whole capacity (storage/fixed.py: capturing()), as a recorded CUDA
    # graph does; untraced they attend the written slots alone: equal within fp rounding, not bit for bit
    torch.testing.assert_close(steps(model, traced, nxt, 8, 4, compiled), steps(model, eager, nxt, 8, 4), atol=1e-5,
                               rtol=1e-5)
    for x, y in zip(traced.tensors(), eager.tensors(), strict=True):  # fp16 latents: within an ulp or so
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs CUDA")
@pytest.mark.parametrize("kw", [dict(), dict(keys="post_rope", absorb=True)], ids=name)
@torch.inference_mode()
def test_cuda_graph_replay_equals_eager(model, ctx, kw):
    store = eager_cache(model, ctx, **kw).storage  # calibrated on the CPU model; the same weights on the GPU
    tokens = torch.randint(0, 97, (2, 8), device="cuda")
    assert_graph_replay_equals_eager(tiny_model().cuda(), store.static_form(16), store.static_form(16), tokens)


@torch.inference_mode()
def test_bytes_are_the_buffers_and_fewer_than_the_dense_static_cache(model, ctx):
    tokens = torch.randint(0, 97, (2, 12))
    static, dense = eager_cache(model, ctx).static_form(24), StaticKVCache(capacity=24)
    prefill(model, static, tokens)
    prefill(model, dense, tokens)
    buffers = static.payload()  # per layer: the key and the value latents (B, 1, capacity, rank)
    assert [sorted(static.slots.view(layer)) for layer in range(3)] == [["key", "value"]] * 3
    assert len(buffers) == 2 * 3 and all(t.shape[2] == 24 and t.dtype == torch.float16 for t in buffers)
    assert static.kv_bytes() == sum(t.nbytes for t in buffers) + static.pos.nbytes + static.index.nbytes
    assert static.kv_bytes() < dense.kv_bytes()
    with_rope = eager_cache(model, ctx, rope_dims=4).static_form(24)
    prefill(model, with_rope, tokens)
    assert [with_rope.slots.view(layer)["rope"].shape for layer in range(3)] == [(2, 2, 24, 4)] * 3
    assert with_rope.kv_bytes() == sum(t.nbytes for t in [*with_rope.payload(), with_rope.pos, with_rope.index])
    before = [t.data_ptr() for t in static.tensors()]
    static.reset(2)  # same batch: cleared in place, addresses kept
    assert [t.data_ptr() for t in static.tensors()] == before and static.tokens_seen == 0


def test_eviction_has_a_captured_form_and_an_uncalibrated_store_is_refused(model, ctx):
    assert eager_cache(model, ctx).static_form(16).slot_addressable  # each layer encodes with its own projections
    assert isinstance(eager_cache(model, ctx, policy=H2O(budget=8)).static_form(16), StaticEvictionCache)
    uncalibrated = LatentStore().static_form(16)
    uncalibrated.setup(spec_of(model))
    uncalibrated.reset(1)
    with pytest.raises(RuntimeError, match="calibrate"), torch.inference_mode():
        model(torch.zeros((1, 2), dtype=torch.long), torch.arange(2)[None], uncalibrated)


def test_speed_on_the_static_path_keeps_the_perplexity(stories, tmp_path):
    from kvcompress.eval.base import EvalContext
    from kvcompress.eval.calibration import Calibration
    from kvcompress.eval.data import default_data_dir
    from kvcompress.eval.speed import Speed

    model, tok = stories
    calib = Calibration(model, tok, default_data_dir(), "tinystories", tokens=256, window=128, cache_dir=tmp_path)
    out = {}
    for path in ("eager", "graph"):
        cache = ComposedCache(LatentStore())
        cache.setup(model.config.spec())
        cache.calibrate(calib)
        ev = Speed(context=32, decode_tokens=5, repeats=1, dataset="tinystories", decode_path=path)
        ev.check(model.config.spec(), default_data_dir())
        out[path] = ev.run(EvalContext(model, tok, cache, default_data_dir(), progress=False))
    assert out["graph"]["decode_path"] == ("graph" if CUDA else "static")
    assert abs(out["graph"]["ppl"] - out["eager"]["ppl"]) < 1e-4 * out["eager"]["ppl"]


# -- the latent kernel over static-capacity buffers (device-side token count) ------------------------------------
def capacity_case(G, T=13, capacity=24, H=2, d=16, rk=6, rv=5, seed=4):
    """Latents of T tokens in buffers of ``capacity`` slots (junk after T), and the bases."""
    g = torch.Generator().manual_seed(seed)
    B, Hq = 2, 4
    q = torch.randn(B, Hq, 1, d, generator=g)
    ck, cv = torch.randn(B, G, capacity, rk, generator=g), torch.randn(B, G, capacity, rv, generator=g)
    k_pos = torch.arange(capacity).expand(B, capacity).clone()
    k_pos[1, T - 2: T] = 2**30  # padding inside the held tokens
    q_pos = torch.full((B, 1), T - 1)
    basis = lambda r: torch.linalg.qr(torch.randn(H, d, r, generator=g))[0]
    bases = (basis(rk), basis(rv), torch.randn(H, d, generator=g))
    return q, q_pos, k_pos, ck, cv, bases


@interpreter
@pytest.mark.parametrize("G", [1, 2])
def test_triton_latent_attention_reads_the_token_count_on_the_device(G):
    T = 13
    q, q_pos, k_pos, ck, cv, bases = capacity_case(G, T)
    want = kernels.latent_attention(q, q_pos, k_pos[:, :T], ck[:, :, :T], cv[:, :, :T], *bases, backend="torch")
    lengths = torch.tensor([0, 0, T], dtype=torch.int32)
    got = kernels.latent_attention(q, q_pos, k_pos, ck, cv, *bases, backend="triton", lengths=lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    ref = kernels.latent_attention(q, q_pos, k_pos, ck, cv, *bases, backend="torch", lengths=lengths)
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=1e-5)


@interpreter
@pytest.mark.parametrize("bits", [None, 8])
@torch.inference_mode()
def test_triton_captured_latents_equal_their_reference(model, ctx, bits):
    """The fused path (keys post-RoPE, absorbed; dense or quantized latents) on the kernel with device lengths vs the
    PyTorch reference."""
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(6))
    out = []
    for backend in ("torch", "triton"):
        kw = dict(keys="post_rope", absorb=True, latent_bits=bits, backend=backend)
        cache = eager_cache(model, ctx, **kw).static_form(10)
        nxt = prefill(model, cache, tokens[:, :5])
        out.append(torch.cat([nxt, steps(model, cache, tokens[:, 5:6], 5, 2)], 1))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(INTERP is not False or CUDA, reason="triton missing, already interpreted here, or CUDA")
def test_kernels_in_an_interpreter_subprocess():
    triton_tests_in_a_subprocess(__file__)
