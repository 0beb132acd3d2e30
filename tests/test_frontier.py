"""Issue 25's storages (FP8, NVFP4 / MXFP4, rotation, product quantization, KVTC transform coding) on a tiny
random Llama (head_dim 32): round trips against independent references (torch's float8 casts, the e2m1 grid by
hand, brute-force nearest centroids, brute-force bit allocations), exact bytes, eager == captured logits,
composition with policies and layouts, and bad settings refused by name."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from conftest import spec_of, static_prefill, tiny_model
from test_storages import ModelCalibration

from kvcompress.cache import ComposedCache, DenseStore
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.policy.streaming import StreamingLLM
from kvcompress.cache.storage.frontier.fp4 import Fp4Store
from kvcompress.cache.storage.frontier.fp8 import Fp8Store
from kvcompress.cache.storage.frontier.kvtc import KVTCStore, allocate, unpack
from kvcompress.cache.storage.frontier.pq import PQStore
from kvcompress.cache.storage.frontier.rotated import IntTokenCodec, RotatedStore, orthogonal
from kvcompress.engine.generate import forward_chunks
from kvcompress.testing import check_method

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


@pytest.fixture(scope="module")
def ctx(model, tmp_path_factory):
    return ModelCalibration(model, tmp_path_factory.mktemp("calib"))


class Samples:
    """A calibration context with given K/V samples for every layer."""

    def __init__(self, k, v, layers=1, tmp="."):
        self.k, self.v, self.layers, self.cache_dir, self.key, self.rope = k, v, layers, str(tmp), "s", None

    def kv_samples(self):
        return [(self.k, self.v, torch.arange(self.k.shape[2])[None])] * self.layers


def ready(store, spec_or_model, ctx=None):
    cache = ComposedCache(store)
    cache.setup(spec_or_model if not hasattr(spec_or_model, "config") else spec_of(spec_or_model))
    if ctx is not None:
        cache.calibrate(ctx)
    return cache


def x_of(seed=0, shape=(2, 2, 5, 32), outlier=False):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    if outlier:
        x[..., 3] *= 20
    return x


# -- round trips against independent references ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_per_token_is_the_float8_cast_of_the_scaled_entry(fmt):
    dtype, fmax = FP8[fmt]
    x = x_of()
    got_k, got_v = Fp8Store(fmt, "token").decode(Fp8Store(fmt, "token").encode(x, -x), torch.float32)
    s = (x.abs().amax(-1, keepdim=True) / fmax).half().float()
    ref = (x / s).clamp(-fmax, fmax).to(dtype).float() * s
    torch.testing.assert_close(got_k, ref, rtol=0, atol=0)
    torch.testing.assert_close(got_v, -ref, rtol=0, atol=0)
    mantissa = 3 if fmt == "e4m3" else 2  # relative error of a normal float8 entry <= 2**-(m+1)
    normal = (x / s).abs() >= torch.finfo(dtype).tiny
    assert ((got_k - x).abs() <= 2.0 ** -(mantissa + 1) * x.abs() * 1.01 + 1e-6)[normal].all()


@pytest.mark.parametrize("scale", ["head", "tensor"])
def test_fp8_calibrated_scale_is_the_absmax(scale, tmp_path):
    k, v = x_of(1, (1, 2, 40, 32)), x_of(2, (1, 2, 40, 32))
    store = Fp8Store("e4m3", scale, keys="pre_rope")
    ready(store, _spec(), Samples(k, v))
    amax = v[0].abs().flatten(1).amax(1)
    want = amax if scale == "head" else amax.amax().expand(1)
    torch.testing.assert_close(store.scales[0]["v"].flatten(), want / 448)
    parts = store.encode(k, v)
    assert set(parts) == {"k", "v"} and parts["k"].dtype == torch.float8_e4m3fn  # no per-token part
    s = store.scales[0]["v"]
    torch.testing.assert_close(store.decode(parts, torch.float32)[1], (v / s).to(torch.float8_e4m3fn).float() * s)


def test_fp8_post_rope_key_scale_bounds_every_rotation():
    """Post-RoPE keys: the calibrated bound is the largest rotate-half pair norm, so no angle overflows it."""
    k = x_of(3, (1, 2, 40, 32))
    store = Fp8Store("e4m3", "head")
    ready(store, _spec(), Samples(k, k))
    pair = (k[..., :16].square() + k[..., 16:].square()).sqrt()[0].flatten(1).amax(1)
    torch.testing.assert_close(store.scales[0]["k"].flatten(), pair / 448)


def mx_reference(x):
    """MXFP4 by hand: blocks of 32, scale 2**(floor(log2 amax) - 2), the nearest e2m1 value, saturating at 6."""
    g = x.unflatten(-1, (-1, 32))
    scale = 2.0 ** (torch.floor(torch.log2(g.abs().amax(-1, keepdim=True))) - 2)
    y = (g / scale).clamp(-6, 6)
    nearest = GRID[(y.abs()[..., None] - GRID).abs().argmin(-1)] * y.sign()
    return (nearest * scale).flatten(-2)


def nv_reference(x, tensor_scale=1.0):
    g = x.unflatten(-1, (-1, 16))
    sb = (g.abs().amax(-1, keepdim=True) / 6 / tensor_scale).to(torch.float8_e4m3fn).float() * tensor_scale
    y = (g / sb).clamp(-6, 6)
    return (GRID[(y.abs()[..., None] - GRID).abs().argmin(-1)] * y.sign() * sb).flatten(-2)


def test_fp4_grids_by_hand():
    x = torch.zeros(1, 1, 1, 32)
    x[..., :8] = torch.tensor([5.2, 0.3, 0.2, 2.6, -1.3, 3.6, -0.7, 7.9])  # amax 7.9: scale 2**(2-2) = 1
    got, _ = Fp4Store("mxfp4").decode(Fp4Store("mxfp4").encode(x, x), torch.float32)
    assert got[0, 0, 0, :8].tolist() == [6.0, 0.5, 0.0, 3.0, -1.5, 4.0, -0.5, 6.0]  # 7.9 saturates at 6
    x = x_of(4)
    for fmt, ref in (("mxfp4", mx_reference), ("nvfp4", nv_reference)):
        store = Fp4Store(fmt)
        k, v = store.decode(store.encode(x, x * 0.01), torch.float32)
        torch.testing.assert_close(k, ref(x), rtol=1e-6, atol=0)
        torch.testing.assert_close(v, ref(x * 0.01), rtol=1e-6, atol=1e-9)


def test_nvfp4_tensor_scale_is_calibrated(tmp_path):
    k = x_of(5, (1, 2, 40, 32))
    store = Fp4Store("nvfp4", keys="pre_rope")
    ready(store, _spec(), Samples(k, k * 100))
    st = store.scales[0]["v"]
    torch.testing.assert_close(st, (k * 100).abs().amax() / (448 * 6))
    x = x_of(6) * 100
    torch.testing.assert_close(store.decode(store.encode(x, x), torch.float32)[1], nv_reference(x, st), rtol=1e-6,
                               atol=0)


def test_pq_codes_are_the_nearest_centroids(tmp_path):
    k, v = x_of(7, (1, 2, 300, 32)), x_of(8, (1, 2, 300, 32))
    store = PQStore(key_sub=4, value_sub=8, iters=5)
    cache = ready(store, _spec(), Samples(k, v, tmp=tmp_path))
    x = x_of(9)
    parts = store.encode(x, x)
    book = store.books[0]["k"].float()  # (H, M, 256, 4)
    sub = x.unflatten(-1, (-1, 4))  # (B, H, T, M, 4)
    dist = (sub[..., None, :] - book[None, :, None]).square().sum(-1)  # (B, H, T, M, 256)
    assert torch.equal(parts["k"].long(), dist.argmin(-1))
    assert parts["k"].dtype == torch.uint8 and parts["k"].shape[-1] == 8 and parts["v"].shape[-1] == 4
    assert cache.calibration_bytes() == sum(b.nbytes for layer in store.books for b in layer.values())
    assert store.books[0]["k"].shape == (2, 8, 256, 4) and store.books[0]["k"].dtype == torch.float16


def test_rotation_is_orthogonal_and_flattens_an_outlier_channel():
    for kind in ("hadamard", "random"):
        r = orthogonal(kind, 32, 0)
        torch.testing.assert_close(r @ r.T, torch.eye(32), atol=1e-5, rtol=0)
    x = x_of(10, outlier=True)

    def err(store):
        store.check(_spec())
        k, _ = store.decode(store.encode(x, x), torch.float32)
        return float((k - x).norm() / x.norm())
    for bits in (4, 2):
        plain = err(IntTokenCodec(bits, bits, 32))
        assert err(RotatedStore("int", key_bits=bits, value_bits=bits)) < 0.6 * plain
    assert err(RotatedStore("mxfp4")) < err(Fp4Store("mxfp4"))


def _spec():
    return spec_of(tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1))


# -- bytes --------------------------------------------------------------------------------------------------------
PER_TOKEN_HEAD = {  # bytes of one token's K + V parts per KV head, head_dim 32
    "fp8 token": (lambda: Fp8Store("e4m3", "token"), 2 * (32 + 2)),
    "fp8 tensor": (lambda: Fp8Store("e5m2", "tensor"), 2 * 32),
    "nvfp4": (lambda: Fp4Store("nvfp4"), 2 * (16 + 2)),
    "mxfp4": (lambda: Fp4Store("mxfp4"), 2 * (16 + 1)),
    "rotated int4/int2 g32": (lambda: RotatedStore("int", key_bits=4, value_bits=2), 16 + 8 + 2 * (2 + 2)),
    "rotated mxfp4": (lambda: RotatedStore("mxfp4"), 2 * (16 + 1)),
    "pq 2/4": (lambda: PQStore(key_sub=2, value_sub=4, iters=2), 16 + 8),
}


@pytest.mark.parametrize("name", list(PER_TOKEN_HEAD))
def test_kv_bytes_are_the_real_codes(model, ctx, name):
    make, per = PER_TOKEN_HEAD[name]
    cache = ready(make(), model, ctx)
    cache.reset(2)
    toks = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        forward_chunks(model, toks, cache, 8)
    assert cache.kv_bytes() == sum(t.nbytes for t in cache.tensors())
    payload = sum(t.nbytes for s in cache.stores() for t in s.payload_tensors())
    assert payload == 4 * 2 * 2 * 24 * per  # layers x rows x KV heads x tokens


# -- both decode paths, policies, layouts -------------------------------------------------------------------------
CODECS = {
    "fp8 token e4m3": lambda: Fp8Store("e4m3", "token"),
    "fp8 head e5m2": lambda: Fp8Store("e5m2", "head"),
    "nvfp4": lambda: Fp4Store("nvfp4"),
    "mxfp4": lambda: Fp4Store("mxfp4"),
    "rotated int4 hadamard": lambda: RotatedStore("int"),
    "rotated nvfp4 random k": lambda: RotatedStore("nvfp4", transform="random", rotate="k"),
    "pq post_rope": lambda: PQStore(iters=3, keys="post_rope"),
}


@pytest.mark.parametrize("name", list(CODECS))
@torch.inference_mode()
def test_eager_equals_captured(model, ctx, name):
    eager = ready(CODECS[name](), model, ctx)
    static = eager.static_form(40)
    assert static is not None
    static.setup(spec_of(model))
    toks = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    a, b = static_prefill(model, eager, toks[:, :16]), static_prefill(model, static, toks[:, :16])
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for t in range(16, 24):  # decode: the eager store attends packed (rotation: the query turned), the static in slots
        pos = torch.full((2, 1), t)
        torch.testing.assert_close(model(toks[:, t:t + 1], pos, static), model(toks[:, t:t + 1], pos, eager),
                                   atol=1e-4, rtol=1e-4)
    dense = static_prefill(model, ready(DenseStore(), model), toks)
    lossy = static_prefill(model, ready(CODECS[name](), model, ctx), toks)
    assert 0 < (lossy - dense).abs().max() < 2.0


@pytest.mark.parametrize("name", ["nvfp4", "rotated int4 hadamard", "pq post_rope"])
@torch.inference_mode()
def test_a_budget_above_the_tokens_is_the_storage_alone(model, ctx, name):
    toks = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(2))
    alone = forward_chunks(model, toks, _reset(ready(CODECS[name](), model, ctx)), 8)
    for policy in (H2O(budget=10_000), StreamingLLM(budget=10_000)):
        cache = ComposedCache(CODECS[name](), policy)
        cache.setup(spec_of(model))
        cache.calibrate(ctx)
        assert torch.equal(forward_chunks(model, toks, _reset(cache), 8), alone)
    for policy in (H2O(budget=12), StreamingLLM(budget=12)):  # real eviction and a shared layout: finite, fewer bytes
        cache = ComposedCache(CODECS[name](), policy, CLA(group_size=2))
        cache.setup(spec_of(model))
        cache.calibrate(ctx)
        out = forward_chunks(model, toks, _reset(cache), 8)
        assert torch.isfinite(out).all() and max(cache.policy.held.values()) <= 12 + cache.policy.slack


def _reset(cache):
    cache.reset(2)
    return cache


# -- settings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda: Fp8Store(format="e3m4"), "storage.format"),
    (lambda: Fp8Store(scale="block"), "storage.scale"),
    (lambda: Fp4Store(format="fp4"), "storage.format"),
    (lambda: RotatedStore(codec="int3"), "storage.codec"),
    (lambda: RotatedStore(transform="dct"), "storage.transform"),
    (lambda: RotatedStore(rotate="q"), "storage.rotate"),
    (lambda: RotatedStore(key_bits=3), "storage.key_bits"),
    (lambda: PQStore(key_sub=0), "storage.key_sub"),
    (lambda: PQStore(iters=0), "storage.iters"),
])
def test_bad_settings_name_themselves(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_settings_checked_against_the_model():
    spec = spec_of(tiny_model(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1))
    for store, match in ((Fp4Store("nvfp4"), "head_dim must be a multiple of 16"),
                         (RotatedStore("int", group_size=8), "transform=hadamard"),
                         (RotatedStore("int", transform="random", group_size=16), "group_size"),
                         (PQStore(value_sub=5), "storage.value_sub=5")):
        with pytest.raises(ValueError, match=match):
            store.check(spec)
    with pytest.raises(ValueError, match="storage.keys=post_rope"):
        ready(PQStore(keys="post_rope"), _spec(), Samples(x_of(1, (1, 2, 8, 32)), x_of(2, (1, 2, 8, 32))))


def test_captured_forms_under_eviction_for_every_codec():
    """An eviction policy's static form encodes new tokens with each layer's own codec and attends as the eager store
    does: layer-free codecs and layer-calibrated ones (scales, codebooks, rotations) are slot-addressable alike."""
    free = [Fp8Store("e4m3", "token"), Fp4Store("mxfp4")]
    layered = [Fp8Store("e4m3", "head"), Fp4Store("nvfp4"), PQStore(keys="post_rope"), RotatedStore("int")]
    assert all(s.static_form(4).slot_addressable for s in free + layered)
    assert PQStore().static_form(4) is None  # pre-RoPE keys decode eagerly


# -- KVTC transform coding ------------------------------------------------------------------------------------------
def test_kvtc_allocation_meets_the_budget_and_is_optimal():
    """Every budget is spent (up to 8 bits a component), and no integer allocation in [0, 3]^4 with the same
    budget has less distortion sum var 4^-b (brute force)."""
    var = torch.tensor([5.0, 2.0, 0.3, 0.01], dtype=torch.float64)
    for budget in range(0, 13):
        bits = allocate(var, budget, max_bits=3)
        assert bits.sum() == budget and bits.max() <= 3 and (bits[:-1] >= bits[1:]).all()
        best = min(sum(var[i] * 4.0 ** -b[i] for i in range(4)) for b in itertools.product(range(4), repeat=4)
                   if sum(b) <= budget)
        assert (var * 4.0 ** -bits.double()).sum() <= best + 1e-12
    assert allocate(var, 100).sum() == 4 * 8  # a budget above 8 bits a component: every component at 8


def _kvtc(bits, tmp, **settings):
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -2, 64)[:, None]  # correlated channels, 2 heads x 32
    k = (torch.randn(512, 64, generator=g) @ mix).view(1, 512, 2, 32).transpose(1, 2)
    store = KVTCStore(bits=bits, **{"block_size": 16, "residual": 0, "sink": 0, **settings})
    ready(store, _spec(), Samples(k, 2 * k, tmp=tmp))
    return store, k


@pytest.mark.parametrize("bits", [1.0, 3.0, 6.0])
def test_kvtc_round_trip_is_within_half_a_step(bits, tmp_path):
    """Decoded coefficients are within half their step of the true ones wherever the code is not clamped, dropped
    components come back as the mean, and the budget is met."""
    store, k = _kvtc(bits, tmp_path)
    t, layer = store.tables[0]["k"], store.fresh(0)
    x = k[:, :, :48].half().float()  # the store codes its fp16 copy of each token
    layer.append_payload(x, x, None)
    got, _ = layer.read_payload()
    assert t["bits"].sum() == round(bits * 64) and t["bits"].max() <= 8
    c, c_hat = ((y.transpose(1, 2).flatten(2) - t["mu"]) @ t["basis"] for y in (x, got))
    b, step = t["bits"].float(), t["step"]
    inside = c.abs() < (2 ** (b - 1) - 1) * step  # not clamped
    assert ((c_hat - c).abs() <= step / 2 + 1e-4)[inside & (b > 0)].all()
    assert (c_hat[..., b == 0].abs() < 1e-4).all()
    err = lambda bb: (KVTCStore.read_payload(_filled(bb, tmp_path, x))[0] - x).square().mean()
    assert err(4.0) < err(2.0) < err(1.0)


def _filled(bits, tmp, x):
    layer = _kvtc(bits, tmp)[0].fresh(0)
    layer.append_payload(x, x, None)
    return layer


def test_kvtc_bytes_are_the_deflated_streams(model, ctx):
    """kv_bytes is the held tensors: sinks and hot window in fp16 and, per cold block, side and bit width, a raw
    DEFLATE stream that inflates to exactly the packed codes."""
    cache = ready(KVTCStore(bits=2.0, block_size=8, residual=4, sink=2), model, ctx)
    cache.reset(2)
    toks = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        forward_chunks(model, toks, cache, 8)
    assert cache.kv_bytes() == sum(t.nbytes for t in cache.tensors())
    for s in cache.stores():
        assert len(s.blobs) == (29 - 2 - 4) // 8 and s.sinks["k"].shape[2] == 2 and s.res["k"].shape[2] == 29 - 2 - 16
        for blob in s.blobs:
            for name in ("k", "v"):
                bits = s.tables[s.layer][name]["bits"]
                assert len(blob[name]) == len(bits.unique()) - int((bits == 0).any())
                for stream, b in zip(blob[name], sorted(set(bits.tolist()) - {0}, reverse=True),
                                            strict=True):
                    n = int((bits == b).sum()) * 2 * 8  # components x rows x block tokens
                    raw = zlib.decompress(stream.numpy().tobytes(), -15)
                    assert len(raw) == -(-n // max(1, 4 // b)) and unpack(torch.tensor(list(raw), dtype=torch.uint8),
                                                                          b, n).max() < 2 ** b
        fp16 = sum(t.nbytes for t in [*s.sinks.values(), *s.res.values()])
        assert sum(t.nbytes for t in s.payload_tensors()) == fp16 + sum(t.nbytes for bl in s.blobs
                                                                        for n in "kv" for t in bl[n])
    assert cache.static_form(40) is None


def test_kvtc_contract_and_settings():
    outcomes = check_method(storage={"_target_": "kvcompress.cache.storage.frontier.kvtc.KVTCStore", "bits": 2.0,
                                     "block_size": 8, "residual": 8, "sink": 2})
    assert all(o == "ran" for o in outcomes.values()), outcomes
    for make, match in ((lambda: KVTCStore(bits=0), "storage.bits"), (lambda: KVTCStore(bits=9), "storage.bits"),
                        (lambda: KVTCStore(block_size=0), "storage.block_size"),
                        (lambda: KVTCStore(level=10), "storage.level"), (lambda: KVTCStore(keys="x"), "storage.keys")):
        with pytest.raises(ValueError, match=match):
            make()
