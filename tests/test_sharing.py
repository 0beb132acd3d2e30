"""Cross-layer sharing: CLA groups and MiniCache merging, exactness, bytes, batch > 1, validation, calibration."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import spec_of, tiny_model

from kvcompress.cache import FullCache
from kvcompress.cache.base import ModelSpec, attention
from kvcompress.cache.sharing.cla import CLACache
from kvcompress.cache.sharing.groups import auto_groups, check_groups, producers, uniform_groups
from kvcompress.cache.sharing.minicache import MiniCache, slerp
from kvcompress.engine.generate import forward_chunks, prefill
from kvcompress.eval.calibration import Calibration
from kvcompress.eval.data import default_data_dir

LAYERS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=LAYERS)


def make(cache, model, batch=1):
    cache.setup(spec_of(model))
    cache.reset(batch)
    return cache


def tokens(batch=2, n=40, seed=0):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def run(model, cache, toks, chunk):
    return forward_chunks(model, toks, make(cache, model, toks.shape[0]), chunk)


class Identity:
    def rotate(self, x, pos):
        return x


# -- groups ----------------------------------------------------------------------------------------
def test_group_helpers():
    assert uniform_groups(5, 2) == [[0, 1], [2, 3], [4]]
    assert uniform_groups(6, 2, start=3) == [[3, 4], [5]]
    assert producers([[0, 1, 2], [4, 5]], 6) == [0, 0, 0, 3, 4, 4]
    # cheapest pairs first: (3,4), (4,5), (1,2) -> consumers 4, 5, 2; 4 and 5 chain onto producer 3
    assert auto_groups([0.9, 0.1, 0.5, 0.0, 0.05], 6, 0.5) == [[1, 2], [3, 4, 5]]
    assert auto_groups([0.3] * 5, 6, 0.0) == []


@pytest.mark.parametrize("groups, msg", [
    ([[2, 1]], "producer (the first layer listed) must be its earliest layer"),
    ([[0, 6]], "layer index 6 is outside [0, 5]"),
    ([[0, 1], [1, 2]], "already belong to another group"),
    ([[0, 2, 1]], "distinct and ascending"),
    ([3], "must be a list of non-empty lists"),
])
def test_bad_groups_are_refused(groups, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_groups(groups, LAYERS)


@pytest.mark.parametrize("kw, msg", [
    (dict(group_size=0), "group_size must be an int >= 1"),
    (dict(groups="most"), "groups must be null"),
    (dict(share_fraction=1.0), "share_fraction must be in"),
    (dict(auto_metric="kl"), "valid choices: ppl, cosine"),
])
def test_bad_cla_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CLACache(**kw)


def test_settings_checked_against_the_model(model):
    for cache, msg in ((CLACache(group_size=7), "group_size must be in \\[1, num_layers=6\\]"),
                       (CLACache(groups=[[4, 9]]), "outside \\[0, 5\\]"),
                       (CLACache(start_layer=6), "start_layer must be in \\[0, num_layers - 1 = 5\\]"),
                       (MiniCache(start_layer=5), "start_layer must be in \\[0, num_layers - 2 = 4\\]")):
        with pytest.raises(ValueError, match=msg):
            cache.setup(spec_of(model))
    for bad in (-0.1, math.pi + 0.01):
        with pytest.raises(ValueError, match="threshold must be an angle in \\[0, pi\\]"):
            MiniCache(threshold=bad)


# -- CLA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7])
def test_groups_of_one_equal_the_full_cache(model, chunk):
    toks = tokens()
    torch.testing.assert_close(run(model, CLACache(group_size=1), toks, chunk),
                               run(model, FullCache(), toks, chunk), rtol=0, atol=0)


def test_consumer_attends_to_the_producer_history():
    spec = ModelSpec("t", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, max_position=64)
    cache = CLACache(groups=[[0, 2]])
    cache.setup(spec)
    cache.reset(2)
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    pos = torch.arange(5).expand(2, -1)
    cache.append(0, k0, v0, pos, Identity())
    cache.append(1, torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), pos, Identity())
    q = torch.randn(2, 4, 5, 8, generator=g)
    assert not cache.computes_kv(2) and cache.computes_kv(1)
    torch.testing.assert_close(cache.attend(2, q, pos), attention(q, k0, v0, pos, pos))
    assert cache.store_for(2) is cache.store_for(0) is not cache.store_for(1)


def test_skipping_projections_keeps_the_logits_and_skips_the_matmul(model, monkeypatch):
    from kvcompress.engine import model as engine

    layer_of = {id(blk.attn.wqkv): n for n, blk in enumerate(model.layers)}
    kv_rows = []  # layers whose k/v rows of wqkv were multiplied

    def spy(x, layer, lo, hi):
        if id(layer) in layer_of and lo > 0:
            kv_rows.append(layer_of[id(layer)])
        return engine.F.linear(x, layer.weight[lo:hi], None if layer.bias is None else layer.bias[lo:hi])

    monkeypatch.setattr(engine, "linear_rows", spy)
    toks = tokens()
    skipped = run(model, CLACache(group_size=3, skip_projections=True), toks, 8)
    skipped_layers, kv_rows[:] = sorted(set(kv_rows)), []
    computed = run(model, CLACache(group_size=3, skip_projections=False), toks, 8)
    torch.testing.assert_close(skipped, computed, rtol=0, atol=0)
    assert skipped_layers == [0, 3] and sorted(set(kv_rows)) == list(range(LAYERS))
    assert not torch.allclose(skipped, run(model, FullCache(), toks, 8))


def test_cla_bytes_are_the_producers_stores(model):
    toks = tokens(n=33)
    full, cla = make(FullCache(), model, 2), make(CLACache(group_size=2), model, 2)
    forward_chunks(model, toks, full, 8)
    forward_chunks(model, toks, cla, 8)
    assert cla.kv_bytes() * 2 == full.kv_bytes()
    assert cla.kv_bytes_fp16() == full.kv_bytes_fp16()
    assert cla.memory_report()["shared_layers"] == 3
    per_layer = 2 * 33 * (2 * 2 * 16 * 4 + 4)  # rows x tokens x (K and V fp32 + int32 position)
    assert cla.kv_bytes() == 3 * per_layer


def test_cla_composes_with_int8_storage(model):
    toks = tokens(n=64)
    dense = make(CLACache(group_size=2), model, 2)
    int8 = make(CLACache(group_size=2, storage="int8", storage_params={"group_size": 16}), model, 2)
    out_dense, out_int8 = forward_chunks(model, toks, dense, 16), forward_chunks(model, toks, int8, 16)
    assert int8.kv_bytes() < dense.kv_bytes() / 2.5
    assert (out_dense - out_int8).abs().max() < 0.1 * out_dense.abs().max()


# -- MiniCache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5])
def test_threshold_zero_keeps_every_token_and_equals_the_full_cache(model, chunk):
    toks = tokens()
    cache = MiniCache(start_layer=1, threshold=0.0)
    torch.testing.assert_close(run(model, cache, toks, chunk), run(model, FullCache(), toks, chunk),
                               rtol=1e-5, atol=1e-5)
    assert cache.memory_report()["merged_fraction"] == 0.0


def test_slerp_midpoint_and_parallel_vectors():
    u, w = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid, angle = slerp(u, w, 0.5)
    torch.testing.assert_close(mid, torch.tensor([[2**-0.5, 2**-0.5]]))
    torch.testing.assert_close(angle, torch.tensor([math.pi / 2]))
    same, angle = slerp(u, u, 0.3)
    torch.testing.assert_close(same, u)
    assert float(angle) == 0.0


def test_merging_parallel_layers_is_lossless():
    """Layer b's K/V = 3 x layer a's: same directions, so merged + magnitudes reconstruct both exactly."""
    spec = ModelSpec("t", num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, max_position=64)
    cache = MiniCache(start_layer=0, threshold=math.pi, magnitude_dtype="float32")
    cache.setup(spec)
    cache.reset(2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    pos = torch.arange(6).expand(2, -1)
    q = torch.randn(2, 2, 1, 8, generator=g)
    for layer, scale in ((0, 1.0), (1, 3.0)):
        cache.append(layer, k * scale, v * scale, pos, Identity())
        cache.attend(layer, q, pos[:, -1:])
    assert cache.memory_report()["merged_fraction"] == 1.0
    for layer, scale in ((0, 1.0), (1, 3.0)):
        k_held, v_held, p_held = cache.store_for(layer).pair.merged.read()
        mags = cache.store_for(layer).pair.magnitudes.view()
        torch.testing.assert_close(k_held * mags[..., layer, None], k * scale)
        torch.testing.assert_close(v_held * mags[..., 2 + layer, None], v * scale)


def test_minicache_bytes_are_the_merged_tensors(model):
    toks = tokens(n=30)
    full = make(FullCache(), model, 2)
    forward_chunks(model, toks, full, 10)
    merged = make(MiniCache(start_layer=2, threshold=math.pi), model, 2)
    forward_chunks(model, toks, merged, 10)
    assert merged.memory_report()["merged_fraction"] == 1.0
    per_layer = 2 * 30 * (2 * 2 * 16 * 4 + 4)  # full-cache bytes of one layer (fp32 K/V + int32 positions)
    pair = per_layer + 2 * 2 * 30 * 4 * 2       # one merged store + 4 fp16 magnitudes per token and head
    assert full.kv_bytes() == LAYERS * per_layer
    assert merged.kv_bytes() == 2 * per_layer + 2 * pair
    assert merged.kv_bytes() == sum(t.nbytes for t in merged.tensors())
    side = merged.stores[2]  # a pair's held positions: every token once (all merged here)
    assert torch.equal(side.positions(), torch.arange(30, dtype=torch.int32).expand(2, -1))


def test_minicache_composes_with_quantized_storage(model):
    toks = tokens(n=32)
    cache = make(MiniCache(start_layer=2, threshold=1.8, storage="int8", storage_params={"group_size": 16}), model, 2)
    out = forward_chunks(model, toks, cache, 8)
    assert torch.isfinite(out).all() and 0 < cache.memory_report()["merged_fraction"] < 1


def decode_steps(model, cache, prompts, steps=3):
    """Right-padded prompts prefilled in chunks of 6, then greedy decode: the logits of every step."""
    cache = make(cache, model, len(prompts))
    logits, pos = prefill(model, prompts, cache, chunk=6)
    out = [logits]
    for _ in range(steps):
        logits = model(logits.argmax(-1)[:, None], pos[:, None], cache)[:, -1]
        out.append(logits)
        pos = pos + 1
    return out


def prompt(n, seed):
    return tokens(1, n, seed=seed)[0].tolist()


BATCH_CACHES = {"cla": lambda: CLACache(group_size=2), "minicache": lambda: MiniCache(start_layer=1, threshold=1.8),
                "cla_int4": lambda: CLACache(groups=[[1, 2, 3]], storage="int4", storage_params={"group_size": 16})}


@torch.inference_mode()
@pytest.mark.parametrize("name", sorted(BATCH_CACHES))
def test_batch_rows_are_independent(model, name):
    """Padded rows of different lengths: a row's logits do not depend on what the other row holds (merge
    decisions and groups are per row). Only summation order may differ: MiniCache pads each step's merged and
    retained tokens to the longest row, so the other row changes where invisible padding slots sit."""
    prompts = [prompt(23, 1), prompt(14, 2)]
    both = decode_steps(model, BATCH_CACHES[name](), prompts)
    for row, other in ((0, prompt(9, 3)), (1, prompt(23, 4))):
        mixed = [prompts[0], other] if row == 0 else [other, prompts[1]]
        alone = decode_steps(model, BATCH_CACHES[name](), mixed)
        for a, b in zip(alone, both, strict=True):
            torch.testing.assert_close(a[row], b[row], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_batch_rows_match_single_rows(model):
    """Against a batch of one (other matmul shapes: last-bit differences, no thresholds to flip)."""
    prompts = [prompt(23, 1), prompt(14, 2)]
    both = decode_steps(model, CLACache(group_size=2), prompts)
    for row, p in enumerate(prompts):
        for a, b in zip(decode_steps(model, CLACache(group_size=2), [p]), both, strict=True):
            torch.testing.assert_close(a[0], b[row], rtol=1e-4, atol=1e-4)


# -- calibration ----------------------------------------------------------------------------------
def test_auto_groups_from_a_saved_calibration(stories, tmp_path):
    model, tok = stories
    ctx = Calibration(model, tok, default_data_dir(), "tinystories", tokens=256, window=128, cache_dir=tmp_path)
    cache = CLACache(groups="auto", share_fraction=0.4)
    cache.setup(spec_of(model))
    cache.calibrate(ctx)
    sim = cache.similarity
    n = model.config.num_layers
    assert sim.key_cos.shape == (n, n) and sim.pair_dnll.shape == (n - 1,)
    torch.testing.assert_close(sim.key_cos.diagonal(), torch.ones(n))
    assert sum(len(g) - 1 for g in cache.groups) == round(0.4 * n)
    assert (tmp_path / f"similarity-{ctx.key}.pt").exists()

    ctx.nll = lambda c: pytest.fail("a saved calibration must be reused, not re-measured")
    again = CLACache(groups="auto", share_fraction=0.4, auto_metric="cosine")
    again.setup(spec_of(model))
    again.calibrate(ctx)
    torch.testing.assert_close(again.similarity.pair_dnll, sim.pair_dnll)
    cheapest = int(torch.argmin(1 - (sim.key_cos.diagonal(1) + sim.value_cos.diagonal(1)) / 2))
    assert any(cheapest in g and cheapest + 1 in g for g in again.groups)


def test_kvc_refuses_bad_sharing_settings_before_loading(tmp_path):
    """Through the app, on a model folder without weights: the setting's error comes first."""
    import shutil

    from conftest import STORIES
    from test_run import FAST, kvc, records

    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    for bad, msg in (("cache=cla", "group [2, 1]: its producer"), ("cache=minicache", "threshold must be an angle")):
        setting = "cache.groups=[[2,1]]" if bad == "cache=cla" else "cache.threshold=4"
        out = kvc(tmp_path, *FAST, "model=local", f"model.source={folder}", bad, setting)
        assert out.returncode == 1 and msg in out.stderr, out.stderr
    assert [r["status"] for r in records(tmp_path)] == ["failed", "failed"]
