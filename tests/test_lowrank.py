"""Latent low-rank storage (``storage=latent``, ``LatentStore``): exact at full rank, absorbed == reconstructed,
calibration files, validation, batch > 1, under a policy and a layout."""
from __future__ import annotations

import pytest
import torch
from conftest import spec_of

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.base import PAD_POSITION
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.storage.latent.store import LatentStore
from kvcompress.engine.generate import forward_chunks
from kvcompress.eval.calibration import Calibration
from kvcompress.eval.data import default_data_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


@pytest.fixture(scope="module")
def calib(stories, tmp_path_factory):
    """A shared calibration context (kv_samples computed once) writing files to a temp dir."""
    model, tok = stories
    return Calibration(model, tok, default_data_dir(), "tinystories", tokens=512, window=128,
                       cache_dir=tmp_path_factory.mktemp("calib"))


def make(model, ctx, policy=None, layout=None, **kw) -> ComposedCache:
    """A cache whose storage is ``LatentStore(**kw)``, set up and calibrated (not yet reset)."""
    cache = ComposedCache(LatentStore(**kw), policy, layout)
    cache.setup(spec_of(model))
    cache.calibrate(ctx)
    return cache


def set_absorb(cache: ComposedCache, absorb: bool) -> None:
    """Switch attention paths on the live per-layer stores (``reset`` copies them from the prototype)."""
    for store in [cache.storage, *cache.views]:
        store.absorb = absorb


def logits(model, tokens, cache, chunk=16):
    return forward_chunks(model, tokens, cache, chunk)


def full_logits(model, tokens, chunk=16):
    cache = FullCache()
    cache.setup(spec_of(model))
    cache.reset(tokens.shape[0])
    return logits(model, tokens, cache, chunk)


VARIANTS = [
    dict(),
    dict(joint_kv=True, per_head=True, rope_dims=2),
    dict(per_head=True, rope_dims=4, rope_select="low"),
    dict(joint_kv=True, keys="post_rope"),
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_full_rank_reproduces_full_cache(stories, story_tokens, calib, kw):
    model = stories[0]
    tokens = story_tokens[:, :48]
    ref = full_logits(model, tokens)
    for absorb in (False, True):
        cache = make(model, calib, rank_fraction=1.0, latent_dtype="float32", absorb=absorb, **kw)
        cache.reset(1)
        torch.testing.assert_close(logits(model, tokens, cache), ref, atol=1e-4, rtol=1e-4)


ABSORB_VARIANTS = VARIANTS + [dict(joint_kv=True, rope_dims=4, nope=True), dict(per_head=True, rope_dims=2, nope=True),
                              dict(rank="auto", energy=0.9)]


@pytest.mark.parametrize("kw", ABSORB_VARIANTS)
def test_absorbed_equals_reconstructed(stories, story_tokens, calib, kw):
    """End to end in fp32 (fp16 latents would amplify 1e-7 differences into rounding flips)."""
    model = stories[0]
    tokens = story_tokens[:, :48]
    out = []
    for absorb in (False, True):
        cache = make(model, calib, rank_fraction=0.5, absorb=absorb, latent_dtype="float32", **kw)
        cache.reset(1)
        out.append(logits(model, tokens, cache, chunk=7))
    torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)
    assert (out[0] - full_logits(model, tokens)).abs().max() > 1e-3  # half rank really compresses


@pytest.mark.parametrize("kw", [dict(latent_bits=8), dict(latent_bits=4, joint_kv=True, rope_dims=2, nope=True),
                                dict(keys="post_rope", per_head=True)])
def test_absorbed_attend_equals_reconstructed_on_same_state(stories, story_tokens, calib, kw):
    """Same stored (fp16 or quantized) latents, both attention paths, every layer; two rows, GQA."""
    model = stories[0]
    cache = make(model, calib, rank_fraction=0.5, **kw)
    cache.reset(2)
    logits(model, story_tokens[:, :40].repeat(2, 1), cache)
    torch.manual_seed(0)
    q = torch.randn(2, 8, 3, 8)
    q_pos = torch.tensor([[10, 38, 39], [0, 20, 39]])
    for layer in range(5):
        set_absorb(cache, False)
        ref = cache.attend(layer, q, q_pos)
        set_absorb(cache, True)
        torch.testing.assert_close(cache.attend(layer, q, q_pos), ref, atol=1e-5, rtol=1e-5)


def test_compression_and_accounting(stories, story_tokens, calib):
    model = stories[0]
    spec = spec_of(model)  # 4 kv heads x head_dim 8
    cache = make(model, calib, rank_fraction=0.5)
    cache.reset(2)
    logits(model, story_tokens[:, :32].repeat(2, 1), cache)
    # fp16 latents: 2 x (16 + 16) bytes per token and layer + int32 position
    assert cache.kv_bytes() == 5 * 2 * 32 * (2 * 32 + 4)
    assert cache.kv_bytes() == sum(t.nbytes for t in cache.tensors())
    assert cache.tokens_seen == 64
    report = cache.memory_report()
    assert report["kv_bytes_fp16"] == spec.fp16_bytes_per_token() * 64
    assert report["calibration_bytes"] == 5 * (2 * (32 * 16 + 32) * 4)  # fp32 bases + means
    assert report["key_rank_mean"] == report["value_rank_mean"] == 16
    q8 = make(model, calib, rank_fraction=0.5, latent_bits=8)
    q8.reset(2)
    logits(model, story_tokens[:, :32].repeat(2, 1), q8)
    assert q8.kv_bytes() < cache.kv_bytes()


def test_batch_rows_match_single_rows_with_padding(stories, story_tokens, calib):
    model = stories[0]
    a, b = story_tokens[:, :32], story_tokens[:, 100:132]
    for kw in (dict(), dict(joint_kv=True, absorb=True, rope_dims=2, nope=True)):
        kw["latent_dtype"] = "float32"  # fp16 rounding flips would differ between batched and single matmuls
        singles = []
        for row in (a, b):
            cache = make(model, calib, rank_fraction=0.5, **kw)
            cache.reset(1)
            singles.append(logits(model, row, cache, chunk=8))
        cache = make(model, calib, rank_fraction=0.5, **kw)
        cache.reset(2)
        batched = logits(model, torch.cat([a, b]), cache, chunk=8)
        torch.testing.assert_close(batched, torch.cat(singles), atol=1e-4, rtol=1e-4)
    # a padded row: its real tokens are unaffected by padding appended at PAD_POSITION
    cache = make(model, calib, rank_fraction=0.5)
    cache.reset(2)
    tok = torch.cat([a[:, :24], a[:, :24]])
    pos = torch.arange(24).repeat(2, 1)
    pos[1, 16:] = PAD_POSITION
    out = model(tok, pos, cache)
    torch.testing.assert_close(out[1, :16], out[0, :16], atol=1e-4, rtol=1e-4)
    assert cache.tokens_seen == 24 + 16


def test_calibration_is_deterministic_and_reused(stories, tmp_path):
    model, tok = stories
    files = []
    for run in range(2):
        ctx = Calibration(model, tok, default_data_dir(), "tinystories", 256, 128, tmp_path / f"run{run}")
        cache = make(model, ctx, rank_fraction=0.5, joint_kv=True)
        assert cache.storage.stats["calibration_reused"] == 0.0 and cache.storage.stats["calibration_s"] > 0
        files.append(list((tmp_path / f"run{run}").glob("latent-*.pt")))
        # saved atomically (artifacts.save): the file and nothing else, no temp file left behind
        assert [p.name for p in (tmp_path / f"run{run}").iterdir()] == [files[-1][0].name]
        assert cache.storage.report()["calibration_file"] == str(files[-1][0])
    assert len(files[0]) == 1 and files[0][0].name == files[1][0].name
    assert files[0][0].name.startswith(f"latent-{ctx.key}-")
    a, b = (torch.load(f[0], weights_only=True)["layers"] for f in files)
    for la, lb in zip(a, b, strict=True):
        assert torch.equal(la["joint"]["basis"], lb["joint"]["basis"])
        assert torch.equal(la["joint"]["mean"], lb["joint"]["mean"])

    class NoSamples(Calibration):
        def kv_samples(self):
            raise AssertionError("a cached calibration must not be recomputed")

    ctx = NoSamples(model, tok, default_data_dir(), "tinystories", 256, 128, tmp_path / "run0")
    cache = make(model, ctx, rank_fraction=0.25, joint_kv=True)  # another rank: same file
    assert cache.storage.stats["calibration_reused"] == 1.0
    assert cache.storage.report()["calibration_reused"] == 1.0


def test_truncated_calibration_file_is_a_clear_error(stories, tmp_path):
    model, tok = stories
    ctx = Calibration(model, tok, default_data_dir(), "tinystories", 256, 128, tmp_path)
    path = tmp_path / "proj.pt"
    make(model, ctx, calibration_file=str(path))
    path.write_bytes(path.read_bytes()[:100])  # an interrupted copy
    with pytest.raises(ValueError, match=r"latent calibration file .*proj\.pt is unreadable or truncated.*delete it"):
        make(model, ctx, calibration_file=str(path))


def test_foreign_calibration_file_is_refused(stories, tmp_path):
    model, tok = stories
    path = tmp_path / "proj.pt"
    ctx = Calibration(model, tok, default_data_dir(), "tinystories", 256, 128, tmp_path)
    make(model, ctx, calibration_file=str(path))
    with pytest.raises(ValueError, match="other settings.*joint_kv=False in the file but True here"):
        make(model, ctx, calibration_file=str(path), joint_kv=True)
    other = Calibration(model, tok, default_data_dir(), "tinystories", 384, 128, tmp_path)
    with pytest.raises(ValueError, match="was made for model/calibration data"):
        make(model, other, calibration_file=str(path))


@pytest.mark.parametrize("kw, match", [
    (dict(rank=33), r"rank=33 is outside \[1, 32\] for the key latent"),
    (dict(rank=9, per_head=True), r"rank=9 is outside \[1, 8\]"),
    (dict(key_rank=0), r"key_rank must be an int >= 1"),
    (dict(value_rank=40), r"value_rank=40 is outside \[1, 32\]"),
    (dict(rank=65, joint_kv=True), r"rank=65 is outside \[1, 64\] for the joint latent"),
    (dict(rank=6, per_head=True, rope_dims=2), None),
    (dict(rank=7, per_head=True, rope_dims=4), r"rank=7 is outside \[1, 4\] for the key latent"),
    (dict(rope_dims=3), "rope_dims must be an even int"),
    (dict(rope_dims=8), "rope_dims=8 must be < head_dim=8"),
    (dict(rank_fraction=1.5), r"storage.rank_fraction must be a number in \(0, 1\]"),
    (dict(nope=True), "nope=true"),
    (dict(latent_bits=3), "unknown storage.latent_bits 3; valid choices"),
    (dict(keys="rotated"), "unknown storage.keys 'rotated'; valid choices: pre_rope, post_rope"),
    (dict(latent_bits=8, latent_group_size=3), "latent_group_size=3 needs latent dimensions that are multiples of 3"),
])
def test_rank_range_errors_before_loading(stories, kw, match):
    spec = spec_of(stories[0])  # validation needs only the spec: no weights, no calibration
    if match is None:
        ComposedCache(LatentStore(**kw)).setup(spec)
        return
    with pytest.raises(ValueError, match=match):
        ComposedCache(LatentStore(**kw)).setup(spec)


def test_per_head_eviction_needs_per_head_latents(stories):
    """A latent across a layer's heads cannot keep different tokens per head: refused in setup, naming the fix."""
    spec = spec_of(stories[0])
    with pytest.raises(ValueError, match="per_head=true keeps different tokens per KV head.*set storage.per_head=true"):
        ComposedCache(LatentStore(), H2O(budget=8, per_head=True)).setup(spec)
    ComposedCache(LatentStore(per_head=True), H2O(budget=8, per_head=True)).setup(spec)


@pytest.mark.parametrize("per_head", [False, True])
def test_latent_under_eviction_and_sharing(stories, story_tokens, calib, per_head):
    """Eviction gathers latents (and the rope part) exactly; CLA stores only the producers' latents."""
    model = stories[0]
    toks = story_tokens[:, :48].repeat(2, 1)
    kw = dict(rank_fraction=0.5, per_head=per_head, rope_dims=2, latent_dtype="float32")
    everything = make(model, calib, **kw)
    everything.reset(2)
    logits(model, toks, everything, chunk=4)
    evicting = make(model, calib, policy=H2O(budget=16, per_head=per_head), **kw)
    evicting.reset(2)
    out = logits(model, toks, evicting, chunk=4)
    assert torch.isfinite(out).all() and evicting.policy.evictions > 0
    assert [v.length for v in evicting.views] == [16] * 5
    assert evicting.kv_bytes() < everything.kv_bytes() / 2
    # layer 0 sees the same inputs with or without eviction: its kept keys and values are the unevicted ones
    k_all, v_all, _ = everything.views[0].read()
    k, v, pos = evicting.views[0].read()
    idx = pos.long() if per_head else pos.long()[:, None].expand(-1, k.shape[1], -1)
    gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
    torch.testing.assert_close(k, k_all.gather(2, gather), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, v_all.gather(2, gather), rtol=1e-5, atol=1e-5)
    shared = make(model, calib, layout=CLA(group_size=2), **kw)
    shared.reset(2)
    assert torch.isfinite(logits(model, toks, shared, chunk=4)).all()
    assert len(shared.stores()) == 3 and shared.kv_bytes() * 5 == everything.kv_bytes() * 3
