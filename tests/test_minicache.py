"""MiniCache merging (layout=minicache): SLERP, lossless merges of parallel layers, the identity at threshold 0,
bytes, the view order (retained, merged, new), keys merged before RoPE, policies over a pair, per-head ones refused."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import (
    FAST,
    STORIES,
    NoRotary,
    compose,
    kvc,
    minicache,
    random_tokens,
    ready,
    records,
    run_chunks,
    tiny_model,
)

from kvcompress.cache import FullCache
from kvcompress.cache.base import PAD_POSITION, ModelSpec
from kvcompress.cache.layout.minicache import MiniCache, slerp
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.policy.kvzip import KVzip
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.engine.generate import forward_chunks
from kvcompress.engine.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


LAYERS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=LAYERS)


@pytest.mark.parametrize("chunk", [1, 5])
def test_threshold_zero_keeps_every_token_and_equals_the_full_cache(model, chunk):
    toks = random_tokens()
    cache = minicache(start_layer=1, threshold=0.0)
    torch.testing.assert_close(run_chunks(model, cache, toks, chunk), run_chunks(model, FullCache(), toks, chunk),
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
    cache = compose(spec, layout=MiniCache(start_layer=0, threshold=math.pi, magnitude_dtype="float32"), batch=2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    pos = torch.arange(6).expand(2, -1)
    q = torch.randn(2, 2, 1, 8, generator=g)
    for layer, scale in ((0, 1.0), (1, 3.0)):
        cache.append(layer, k * scale, v * scale, pos, NoRotary())
        cache.attend(layer, q, pos[:, -1:])
    assert cache.memory_report()["merged_fraction"] == 1.0
    for layer, scale in ((0, 1.0), (1, 3.0)):
        k_held, v_held, p_held = cache.views[layer].pair.merged.read()
        mags = cache.views[layer].pair.magnitudes.view()
        torch.testing.assert_close(k_held * mags[..., layer, None], k * scale)
        torch.testing.assert_close(v_held * mags[..., 2 + layer, None], v * scale)
        torch.testing.assert_close(cache.views[layer].read()[0], k * scale)  # the layer's view reconstructs it


def test_minicache_bytes_are_the_merged_tensors(model):
    toks = random_tokens(n=30)
    full = ready(FullCache(), model, 2)
    forward_chunks(model, toks, full, 10)
    merged = ready(minicache(start_layer=2, threshold=math.pi), model, 2)
    forward_chunks(model, toks, merged, 10)
    assert merged.memory_report()["merged_fraction"] == 1.0
    per_layer = 2 * 30 * (2 * 2 * 16 * 4 + 4)  # full-cache bytes of one layer (fp32 K/V + int32 positions)
    pair = per_layer + 2 * 2 * 30 * 4 * 2       # one merged store + 4 fp16 magnitudes per token and head
    assert full.kv_bytes() == LAYERS * per_layer
    assert merged.kv_bytes() == 2 * per_layer + 2 * pair
    assert merged.kv_bytes() == sum(t.nbytes for t in merged.tensors())
    assert len(merged.stores()) == LAYERS and merged.owner == [0, 1, 2, 2, 4, 4]
    side = merged.views[2]  # a pair's held positions: every token once (all merged here)
    assert torch.equal(side.positions(), torch.arange(30, dtype=torch.int32).expand(2, -1))


def test_minicache_composes_with_quantized_storage(model):
    toks = random_tokens(n=32)
    cache = ready(minicache(QuantizedStore(bits=8, group_size=16), start_layer=2, threshold=1.8), model, 2)
    out = forward_chunks(model, toks, cache, 8)
    assert torch.isfinite(out).all() and 0 < cache.memory_report()["merged_fraction"] < 1


def test_h2o_over_minicache_keeps_one_selection_per_pair(model):
    cache = ready(minicache(policy=H2O(budget=12), start_layer=2, threshold=1.8), model, 2)
    forward_chunks(model, random_tokens(n=40), cache, 4)
    report = cache.memory_report()
    assert report["evictions"] > 0 and 0 < report["merged_fraction"] < 1
    for a, b in ((2, 3), (4, 5)):
        assert torch.equal(cache.views[a].positions(), cache.views[b].positions())
        real = (cache.views[a].positions() < PAD_POSITION).sum(-1)
        assert (real == 12).all()  # rows keep different retained / merged splits: padded slots are invisible
    assert [cache.views[layer].length for layer in (0, 1)] == [12, 12]


def test_replay_over_ragged_prompts_leaves_each_row_as_alone(model):
    """KVzip's replay over prompts of different lengths ends by dropping each row's replayed tokens: rows keep
    different counts, so the pair hides padding slots (mapped back through its retained / merged split). A batched
    row then decodes as it does alone."""
    prompts = [random_tokens(1, n, seed=n)[0].tolist() for n in (20, 13)]

    def decode(rows, next_tokens):
        policy = KVzip(budget=8, when="prefill", scope="layer", granularity="layer", sinks=0)
        cache = ready(minicache(policy=policy, start_layer=2, threshold=1.0), model, len(rows))
        session = Session(model, cache, chunk=4).start(len(rows))
        last, lengths = session.prefill(rows)
        steps = [session.step(torch.tensor(next_tokens), lengths + t) for t in range(4)]
        assert cache.memory_report()["replay_tokens"] == sum(map(len, rows)) + len(rows) * len(policy.replay_prefix())
        return torch.stack([last, *steps], 1)

    both, alone = decode(prompts, [1, 2]), decode(prompts[1:], [2])
    torch.testing.assert_close(both[1], alone[0], rtol=0, atol=1e-5)


def test_minicache_view_order_is_retained_merged_new():
    """Tokens whose directions disagree (antiparallel here) are retained; a view lists the retained tokens, then
    the merged ones, then its own new tokens (not merged until the pair's second layer attended)."""
    spec = ModelSpec("t", num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, max_position=64)
    cache = compose(spec, layout=MiniCache(start_layer=0, threshold=math.pi / 2), batch=2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0])[None, None, :, None]  # tokens 1 and 3 disagree
    pos = torch.arange(6).expand(2, -1)
    q = torch.randn(2, 2, 1, 8, generator=g)
    for layer, kk, vv in ((0, k, v), (1, k * sign, v * sign)):
        cache.append(layer, kk[:, :, :5], vv[:, :, :5], pos[:, :5], NoRotary())
        cache.attend(layer, q, pos[:, 4:5])
    assert cache.memory_report()["merged_fraction"] == pytest.approx(3 / 5)
    cache.append(0, k[:, :, 5:], v[:, :, 5:], pos[:, 5:], NoRotary())
    assert cache.views[0].positions().tolist() == [[1, 3, 0, 2, 4, 5]] * 2
    assert cache.views[1].positions().tolist() == [[1, 3, 0, 2, 4]] * 2
    k_view = cache.views[0].read()[0]
    torch.testing.assert_close(k_view[:, :, :2], k[:, :, [1, 3]])  # retained: exact
    torch.testing.assert_close(k_view[:, :, 5], k[:, :, 5])  # new: exact


@pytest.mark.parametrize("keys", ["post_rope", "pre_rope"])
def test_minicache_merges_keys_before_rope(model, keys):
    """Pending keys arrive before RoPE and are merged so; the pair's stores then hold them by their key mode, and
    every view reads rotated keys. Parallel layers merge losslessly under a real rotary embedding."""
    from kvcompress.cache import DenseStore

    rope = model.rope
    cache = compose(model, DenseStore(keys=keys), layout=MiniCache(start_layer=0, threshold=math.pi,
                                                                   magnitude_dtype="float32"), batch=2)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g)
    pos = torch.arange(3, 9).expand(2, -1)
    q = torch.randn(2, 4, 1, 16, generator=g)
    for layer, scale in ((0, 1.0), (1, 3.0)):
        cache.append(layer, k * scale, v * scale, pos, rope)
        cache.attend(layer, q, pos[:, -1:])
    pair = cache.views[0].pair
    direction = k / k.norm(dim=-1, keepdim=True)
    stored = pair.merged.parts.view()["k"]  # the raw payload: unrotated directions with pre_rope keys
    torch.testing.assert_close(stored, direction if keys == "pre_rope" else rope.rotate(direction, pos))
    for layer, scale in ((0, 1.0), (1, 3.0)):
        torch.testing.assert_close(cache.views[layer].read()[0], rope.rotate(k * scale, pos))


def test_per_head_policies_over_minicache_are_refused_before_load(tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    for policy in ("adakv", "duo_attention"):
        out = kvc(tmp_path, *FAST, "model=local", f"model.source={folder}", f"policy={policy}", "policy.budget=10000",
                  "layout=minicache", "layout.start_layer=0")
        assert out.returncode == 1
        assert f"policy={policy} layout=minicache" in out.stderr and "layout=per_layer" in out.stderr
        assert "PairSide" not in out.stderr and "weights" not in records(tmp_path)[-1]["error"]
