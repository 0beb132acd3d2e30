"""KVQuant, GEAR, ThinK (storages) and xKV (layout x latent) on a tiny random Llama (head_dim 32):
identity settings equal the dense store, error falls as bits / rank / kept channels rise, exact accounting,
batch rows independent, composition with an eviction policy, calibration saved and reused."""
from __future__ import annotations

import pytest
import torch
from conftest import spec_of, tiny_model

from kvcompress.cache import ComposedCache, DenseStore
from kvcompress.cache.layout.base import Layout
from kvcompress.cache.layout.xkv import XKV
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.storage.gear import GEARStore
from kvcompress.cache.storage.kvquant import KVQuantStore, pack_codes, unpack_codes
from kvcompress.cache.storage.latent.store import LatentStore
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.cache.storage.think import ThinKStore
from kvcompress.engine.generate import forward_chunks
from kvcompress.eval.ppl import window_nll


class ModelCalibration:
    """A calibration context that runs the model (K/V samples and ``nll``) on random tokens."""

    def __init__(self, model, tmp, n: int = 128):
        self.model, self.cache_dir, self.key, self.progress = model, str(tmp), "tiny-model", False
        self.rope = model.rope
        self.windows = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(5))
        self.nll_calls = 0

    def kv_samples(self):
        rec = Recorder()
        rec.setup(spec_of(self.model))
        rec.reset(1)
        with torch.inference_mode():
            forward_chunks(self.model, self.windows[:1], rec, 16)
        return [(torch.cat([k for k, _, _ in s], 2), torch.cat([v for _, v, _ in s], 2),
                 torch.cat([p for _, _, p in s], 1)) for s in rec.samples]

    def nll(self, cache):
        self.nll_calls += 1
        with torch.inference_mode():
            total, n, _ = window_nll(self.model, self.windows, cache, 16)
        return total / n


class Recorder(ComposedCache):
    def reset(self, batch_size):
        super().reset(batch_size)
        self.samples = [[] for _ in range(self.spec.num_layers)]

    def append(self, layer, k, v, pos, rope):
        self.samples[layer].append((k.clone(), v.clone(), pos.clone()))
        super().append(layer, k, v, pos, rope)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


@pytest.fixture(scope="module")
def ctx(model, tmp_path_factory):
    return ModelCalibration(model, tmp_path_factory.mktemp("calib"))


def cache_of(model, ctx, storage, policy=None, layout=None):
    cache = ComposedCache(storage, policy, layout)
    cache.setup(spec_of(model))
    cache.calibrate(ctx)
    return cache


def run(model, cache, toks, chunk: int = 8):
    cache.reset(toks.shape[0])
    with torch.inference_mode():
        return forward_chunks(model, toks, cache, chunk)


def toks(seed: int = 0, batch: int = 2, n: int = 64):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def store_error(model, ctx, storage) -> float:
    """Relative error of the K/V a store reads back, summed over layers (after a 64-token prompt)."""
    cache = cache_of(model, ctx, storage)
    ref = cache_of(model, ctx, DenseStore(keys=storage.keys))
    run(model, cache, toks())
    run(model, ref, toks())
    err = 0.0
    for a, b in zip(cache.stores(), ref.stores(), strict=True):
        (ka, va, _), (kb, vb, _) = a.read(), b.read()
        err += float((ka - kb).norm() / kb.norm() + (va - vb).norm() / vb.norm())
    return err


def test_three_bit_packing_roundtrip():
    codes = torch.randint(0, 8, (2, 3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.shape[-1] == 24 and torch.equal(unpack_codes(packed, 3), codes)


IDENTITIES = [
    ("kvquant", lambda: KVQuantStore(bits=2, outlier_fraction=1.0, outlier_dtype="model"), "pre_rope"),
    ("think", lambda: ThinKStore(prune_fraction=0.0, dtype="model"), "post_rope"),
]


@pytest.mark.parametrize("name,make,keys", IDENTITIES, ids=[i[0] for i in IDENTITIES])
def test_identity_setting_is_dense(model, ctx, name, make, keys):
    t = toks(1)
    out = run(model, cache_of(model, ctx, make()), t)
    ref = run(model, cache_of(model, ctx, DenseStore(keys=keys)), t)
    assert torch.equal(out, ref)


def test_gear_full_rank_reconstructs_within_rounding(model, ctx):
    """No exact identity (codes and factors are fp16): full-rank residual factors leave only fp16 rounding."""
    full = store_error(model, ctx, GEARStore(bits=2, group_size=8, block_size=16, rank=16, outlier_fraction=0))
    assert full < 4e-3


@pytest.mark.parametrize("make,settings", [
    (lambda b: KVQuantStore(bits=b, outlier_fraction=0.0), (2, 3, 4)),
    (lambda b: KVQuantStore(bits=b, outlier_fraction=0.05), (2, 3, 4)),
    (lambda r: GEARStore(bits=2, group_size=8, block_size=16, rank=r, outlier_fraction=0), (0, 2, 8)),
    (lambda f: GEARStore(bits=2, group_size=8, block_size=16, rank=0, outlier_fraction=f), (0.0, 0.02, 0.1)),
    (lambda p: ThinKStore(prune_fraction=p, dtype="model"), (0.75, 0.5, 0.25)),
], ids=["kvquant-bits", "kvquant-bits-outliers", "gear-rank", "gear-outliers", "think-kept"])
def test_error_falls_as_budget_rises(model, ctx, make, settings):
    errors = [store_error(model, ctx, make(s)) for s in settings]
    assert errors[0] > errors[1] > errors[2], errors


def test_kvquant_outliers_help_and_bytes_are_the_tensors(model, ctx):
    plain, sparse = KVQuantStore(bits=3, outlier_fraction=0.0), KVQuantStore(bits=3, outlier_fraction=0.05)
    assert store_error(model, ctx, sparse) < store_error(model, ctx, plain)
    cache = cache_of(model, ctx, KVQuantStore(bits=3, outlier_fraction=0.05))
    run(model, cache, toks(n=40))
    B, H, T, D = 2, 2, 40, 32
    k_out = round(0.05 * D)
    per_token = 2 * (3 * D // 8 + k_out * (2 + 1)) + 4  # codes (3 bits packed), fp16 outlier + uint8 index, V scale
    assert cache.kv_bytes() == 4 * B * H * T * per_token + 4 * B * T * 4  # + int32 positions
    report = cache.memory_report()  # after a batch ran
    assert report["calibration_bytes"] > 0 and report["calibration_file"].endswith(".pt")


def test_gear_bytes_count_factors_and_outliers(model, ctx):
    s = GEARStore(bits=2, group_size=8, block_size=16, rank=2, outlier_fraction=0.02)
    cache = cache_of(model, ctx, s)
    run(model, cache, toks(n=40))  # per layer, row and head: 32 tokens in 2 blocks of 16, then 8 in fp16
    D, n_out = 32, round(0.02 * 16 * 32)
    codes, scales = 32 * D // 4, 2 * 2 * 32 * D // 8  # keys: per channel and 8 tokens; values: per token, 8 channels
    factors = 32 * 2 * 2 + 2 * 2 * D * 2  # A: rank-2 fp16 row per token; B: rank x head_dim fp16 per block
    side = codes + scales + factors + 2 * n_out * (2 + 2) + 8 * D * 2  # + fp16 outliers, int16 indices, fp16 tail
    assert cache.kv_bytes() == 4 * 2 * 2 * 2 * side + 4 * 2 * 40 * 4  # layers x rows x heads x (K, V) + positions


ALL = {
    "kvquant-3bit": lambda: KVQuantStore(bits=3),
    "kvquant-post-rope": lambda: KVQuantStore(bits=2, keys="post_rope", sensitivity="none"),
    "gear": lambda: GEARStore(bits=2, group_size=8, block_size=16, rank=2),
    "think": lambda: ThinKStore(prune_fraction=0.5),
    "think-kivi": lambda: ThinKStore(prune_fraction=0.5, bits=2, group_size=8, residual=8),
}


@pytest.mark.parametrize("name", ALL)
def test_rows_independent_and_composes_with_eviction(model, ctx, name):
    t = toks(2, n=48)
    other = t.clone()
    other[1] = toks(3, n=48)[1]
    for policy in (None, H2O(budget=0.5)):
        a = run(model, cache_of(model, ctx, ALL[name](), policy), t)
        cache = cache_of(model, ctx, ALL[name](), policy)
        b = run(model, cache, other)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)
        assert cache.kv_bytes() == sum(t.nbytes for t in cache.tensors())
    assert cache.policy.evictions > 0 and max(v.length for v in cache.stores()) <= 24 + 8


def test_calibration_saved_and_reused(model, ctx, tmp_path):
    local = ModelCalibration(model, tmp_path)
    for make in (lambda: KVQuantStore(bits=2), lambda: ThinKStore(prune_fraction=0.5)):
        first = cache_of(model, local, make())
        again = cache_of(model, local, make())
        assert first.storage.report()["calibration_reused"] == 0.0 and again.storage.report()["calibration_reused"] == 1
        assert first.storage.report()["calibration_file"] == again.storage.report()["calibration_file"]
        assert all(torch.equal(x, y) for x, y in zip(first.calibration_tensors(), again.calibration_tensors(),
                                                     strict=True))
    assert local.nll_calls == 1  # query moments measured once, shared by KVQuant and ThinK
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["channels", "kvquant", "think"]


def test_think_keeps_the_highest_scoring_channels(model, ctx):
    cache = cache_of(model, ctx, ThinKStore(prune_fraction=0.75))
    s = cache.storage
    assert all(k.shape == (2, 8) for k in s.kept) and s.report()["think_kept_channels"] == 8
    run(model, cache, toks(n=16))
    k, _, _ = cache.stores()[0].read()
    pruned = torch.ones(32, dtype=torch.bool)
    pruned[s.kept[0][0]] = False
    assert (k[:, 0][..., pruned] == 0).all() and (k[:, 0][..., ~pruned] != 0).any()


def test_xkv_shares_one_basis_per_group(model, ctx):
    per_layer = cache_of(model, ctx, LatentStore(rank_fraction=0.5), layout=Layout())
    xkv = cache_of(model, ctx, LatentStore(rank_fraction=0.5), layout=XKV(group_size=2))
    s = xkv.storage
    assert s.layers[0]["key"] is s.layers[1]["key"] and s.layers[1]["key"] is not s.layers[2]["key"]
    assert xkv.calibration_bytes() * 2 == per_layer.calibration_bytes()
    t = toks(4)
    out, ref = run(model, xkv, t), run(model, per_layer, t)
    assert "xkv" in xkv.memory_report()["calibration_file"] and xkv.memory_report()["xkv_groups"] == "0-1 2-3"
    assert xkv.kv_bytes() == per_layer.kv_bytes() and torch.isfinite(out).all() and not torch.equal(out, ref)
    # group size 1 is per_layer exactly
    torch.testing.assert_close(run(model, cache_of(model, ctx, LatentStore(rank_fraction=0.5), layout=XKV(1)), t),
                               ref, rtol=0, atol=0)


def test_xkv_refuses_a_storage_that_does_not_calibrate(model):
    cache = ComposedCache(QuantizedStore(bits=4), None, XKV(group_size=2))
    with pytest.raises(ValueError, match="layout=xkv .* QuantizedStore .* storage=latent"):
        cache.setup(spec_of(model))


@pytest.mark.parametrize("make,match", [
    (lambda: KVQuantStore(bits=5), "storage.bits"),
    (lambda: KVQuantStore(outlier_fraction=1.5), r"storage.outlier_fraction must be a number in \[0, 1\]"),
    (lambda: GEARStore(block_size=48, group_size=32), "storage.block_size=48 must be a multiple"),
    (lambda: GEARStore(rank=-1), r"storage.rank must be an int >= 0"),
    (lambda: ThinKStore(prune_fraction=1.0), r"storage.prune_fraction must be a number in \[0, 1\)"),
    (lambda: ThinKStore(keys="pre_rope"), "storage.keys"),
    (lambda: XKV(group_size=0), r"layout.group_size must be an int >= 1"),
])
def test_bad_settings_name_themselves(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_settings_checked_against_the_model(model):
    for store, match in ((GEARStore(rank=40, block_size=64), r"storage.rank must be an int in \[0, 32\]"),
                         (GEARStore(group_size=24, block_size=48), "storage.group_size=24 must divide head_dim=32")):
        with pytest.raises(ValueError, match=match):
            ComposedCache(store).setup(spec_of(model))
    with pytest.raises(ValueError, match="layout.group_size must be in"):
        ComposedCache(LatentStore(), None, XKV(group_size=5)).setup(spec_of(model))
