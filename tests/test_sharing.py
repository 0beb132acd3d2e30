"""Cross-layer sharing (the layout axis): CLA groups and MiniCache merging, exactness, bytes, batch > 1, validation,
calibration, and a policy over a shared or merged store (one selection, scored by all its readers)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import FAST, STORIES, NoRotary, compose, kvc, records, spec_of, tiny_model

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.base import PAD_POSITION, ModelSpec, attention, attention_with_weights
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.layout.groups import auto_groups, check_groups, producers, uniform_groups
from kvcompress.cache.layout.minicache import MiniCache, slerp
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.engine.generate import forward_chunks, prefill
from kvcompress.eval.calibration import Calibration
from kvcompress.eval.data import default_data_dir

LAYERS = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=LAYERS)


def make(cache, model, batch=1):
    cache.setup(spec_of(model))
    cache.reset(batch)
    return cache


def cla(storage=None, policy=None, **kw) -> ComposedCache:
    return ComposedCache(storage, policy, CLA(**kw))


def minicache(storage=None, policy=None, **kw) -> ComposedCache:
    return ComposedCache(storage, policy, MiniCache(**kw))


def tokens(batch=2, n=40, seed=0):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def run(model, cache, toks, chunk):
    return forward_chunks(model, toks, make(cache, model, toks.shape[0]), chunk)


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
    (dict(share_fraction=1.0), r"layout.share_fraction must be a number in \[0, 1\)"),
    (dict(auto_metric="kl"), "valid choices: ppl, cosine"),
])
def test_bad_cla_settings(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CLA(**kw)


def test_settings_checked_against_the_model(model):
    for cache, msg in ((cla(group_size=7), "layout.group_size must be in \\[1, num_layers=6\\]"),
                       (cla(groups=[[4, 9]]), "outside \\[0, 5\\]"),
                       (cla(start_layer=6), "layout.start_layer must be in \\[0, num_layers - 1 = 5\\]"),
                       (cla(groups="auto", share_fraction=0.95), "share_fraction must leave layer 0 a producer"),
                       (minicache(start_layer=5), "layout.start_layer must be in \\[0, num_layers - 2 = 4\\]")):
        with pytest.raises(ValueError, match=msg):
            cache.setup(spec_of(model))
    for bad in (-0.1, math.pi + 0.01):
        with pytest.raises(ValueError, match=r"layout.threshold \(the retention angle in radians\) must be a number "
                                             r"in \[0, 3.14159"):
            MiniCache(threshold=bad)
    for bad, setting in ((dict(t=1.5), "layout.t"), (dict(magnitude_dtype="model"), "layout.magnitude_dtype"),
                         (dict(magnitude_dtype="int8"), "layout.magnitude_dtype")):
        with pytest.raises(ValueError, match=setting):
            MiniCache(**bad)


# -- CLA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7])
def test_groups_of_one_equal_the_full_cache(model, chunk):
    toks = tokens()
    torch.testing.assert_close(run(model, cla(group_size=1), toks, chunk),
                               run(model, FullCache(), toks, chunk), rtol=0, atol=0)


def test_consumer_attends_to_the_producer_history():
    spec = ModelSpec("t", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, max_position=64)
    cache = compose(spec, layout=CLA(groups=[[0, 2]]), batch=2)
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    pos = torch.arange(5).expand(2, -1)
    cache.append(0, k0, v0, pos, NoRotary())
    cache.append(1, torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), pos, NoRotary())
    q = torch.randn(2, 4, 5, 8, generator=g)
    assert not cache.computes_kv(2) and cache.computes_kv(1)
    torch.testing.assert_close(cache.attend(2, q, pos), attention(q, k0, v0, pos, pos))
    assert cache.views[2] is cache.views[0] is not cache.views[1]
    assert cache.owner == [0, 1, 0] and len(cache.stores()) == 2


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
    skipped = run(model, cla(group_size=3, skip_projections=True), toks, 8)
    skipped_layers, kv_rows[:] = sorted(set(kv_rows)), []
    computed = run(model, cla(group_size=3, skip_projections=False), toks, 8)
    torch.testing.assert_close(skipped, computed, rtol=0, atol=0)
    assert skipped_layers == [0, 3] and sorted(set(kv_rows)) == list(range(LAYERS))
    assert not torch.allclose(skipped, run(model, FullCache(), toks, 8))


def test_cla_bytes_are_the_producers_stores(model):
    toks = tokens(n=33)
    full, shared = make(FullCache(), model, 2), make(cla(group_size=2), model, 2)
    forward_chunks(model, toks, full, 8)
    forward_chunks(model, toks, shared, 8)
    assert shared.kv_bytes() * 2 == full.kv_bytes()
    assert shared.kv_bytes_fp16() == full.kv_bytes_fp16()
    assert shared.memory_report()["shared_layers"] == 3
    assert shared.memory_report()["kv_bytes_allocated"] * 2 == full.memory_report()["kv_bytes_allocated"]
    per_layer = 2 * 33 * (2 * 2 * 16 * 4 + 4)  # rows x tokens x (K and V fp32 + int32 position)
    assert shared.kv_bytes() == 3 * per_layer and len(shared.views) == LAYERS and len(shared.stores()) == 3


def test_cla_composes_with_int8_storage(model):
    toks = tokens(n=64)
    dense = make(cla(group_size=2), model, 2)
    int8 = make(cla(QuantizedStore(bits=8, group_size=16), group_size=2), model, 2)
    out_dense, out_int8 = forward_chunks(model, toks, dense, 16), forward_chunks(model, toks, int8, 16)
    assert int8.kv_bytes() < dense.kv_bytes() / 2.5
    assert (out_dense - out_int8).abs().max() < 0.1 * out_dense.abs().max()


# -- MiniCache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5])
def test_threshold_zero_keeps_every_token_and_equals_the_full_cache(model, chunk):
    toks = tokens()
    cache = minicache(start_layer=1, threshold=0.0)
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
    toks = tokens(n=30)
    full = make(FullCache(), model, 2)
    forward_chunks(model, toks, full, 10)
    merged = make(minicache(start_layer=2, threshold=math.pi), model, 2)
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
    toks = tokens(n=32)
    cache = make(minicache(QuantizedStore(bits=8, group_size=16), start_layer=2, threshold=1.8), model, 2)
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


BATCH_CACHES = {"cla": lambda: cla(group_size=2), "minicache": lambda: minicache(start_layer=1, threshold=1.8),
                "cla_int4": lambda: cla(QuantizedStore(bits=4, group_size=16), groups=[[1, 2, 3]]),
                "minicache_h2o": lambda: minicache(policy=H2O(budget=12), start_layer=1, threshold=1.8),
                "minicache_h2o_per_head": lambda: minicache(policy=H2O(budget=12, per_head=True), start_layer=1,
                                                            threshold=1.8)}


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
    both = decode_steps(model, cla(group_size=2), prompts)
    for row, p in enumerate(prompts):
        for a, b in zip(decode_steps(model, cla(group_size=2), [p]), both, strict=True):
            torch.testing.assert_close(a[0], b[row], rtol=1e-4, atol=1e-4)


# -- calibration ----------------------------------------------------------------------------------
def test_auto_groups_from_a_saved_calibration(stories, tmp_path):
    model, tok = stories
    ctx = Calibration(model, tok, default_data_dir(), "tinystories", tokens=256, window=128, cache_dir=tmp_path)
    cache = cla(groups="auto", share_fraction=0.4)
    cache.setup(spec_of(model))
    assert cache.layout.groups == []  # until calibrated
    cache.calibrate(ctx)
    sim = cache.layout.similarity
    n = model.config.num_layers
    assert sim.key_cos.shape == (n, n) and sim.pair_dnll.shape == (n - 1,)
    torch.testing.assert_close(sim.key_cos.diagonal(), torch.ones(n))
    assert sum(len(g) - 1 for g in cache.layout.groups) == round(0.4 * n)
    assert [p.name for p in tmp_path.iterdir()] == [f"similarity-{ctx.key}.pt"]  # saved atomically, no temp file
    cache.reset(1)
    assert len(cache.stores()) == n - round(0.4 * n) and cache.memory_report()["shared_layers"] == round(0.4 * n)

    ctx.nll = lambda c: pytest.fail("a saved calibration must be reused, not re-measured")
    again = cla(groups="auto", share_fraction=0.4, auto_metric="cosine")
    again.setup(spec_of(model))
    again.calibrate(ctx)
    torch.testing.assert_close(again.layout.similarity.pair_dnll, sim.pair_dnll)
    cheapest = int(torch.argmin(1 - (sim.key_cos.diagonal(1) + sim.value_cos.diagonal(1)) / 2))
    assert any(cheapest in g and cheapest + 1 in g for g in again.layout.groups)

    (tmp_path / f"similarity-{ctx.key}.pt").write_bytes(b"not a torch file")
    broken = cla(groups="auto", share_fraction=0.4)
    broken.setup(spec_of(model))
    with pytest.raises(ValueError, match="layer-similarity calibration file .* is unreadable or truncated"):
        broken.calibrate(ctx)


def test_kvc_refuses_bad_sharing_settings_before_loading(tmp_path):
    """Through the app, on a model folder without weights: the setting's error comes first."""
    import shutil

    from conftest import STORIES
    from test_run import FAST, kvc, records

    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    for bad, msg in (("layout=cla", "group [2, 1]: its producer"),
                     ("layout=minicache", "layout.threshold (the retention angle in radians) must be a number in")):
        setting = "layout.groups=[[2,1]]" if bad == "layout=cla" else "layout.threshold=4"
        out = kvc(tmp_path, *FAST, "model=local", f"model.source={folder}", bad, setting)
        assert out.returncode == 1 and msg in out.stderr, out.stderr
    assert [r["status"] for r in records(tmp_path)] == ["failed", "failed"]


# -- a layout under a policy, and MiniCache's order and key mode ------------------------------------------
@pytest.mark.parametrize("layout", ["cla", "minicache"])
def test_a_policy_scores_a_shared_store_with_every_reader(layout):
    """H2O over a CLA group or a MiniCache pair: one score per store, the sum of its readers' attention weights,
    observed once the last reader attended (kept under the owner layer)."""
    spec = ModelSpec("t", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position=1000)
    shape = CLA(groups=[[0, 1]]) if layout == "cla" else MiniCache(start_layer=0, threshold=math.pi)
    cache = compose(spec, policy=H2O(budget=500), layout=shape, batch=2)
    g = torch.Generator().manual_seed(0)
    k0, v0, k1, v1 = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(4))
    q0, q1 = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 4, 5, 8, generator=g)
    pos = torch.arange(5).expand(2, -1)
    cache.append(0, k0, v0, pos, NoRotary())
    cache.attend(0, q0, pos)
    assert cache.policy.state[0] is None  # the store's last reader has not attended yet
    cache.append(1, k1, v1, pos, NoRotary())  # CLA: a consumer's k/v are discarded
    cache.attend(1, q1, pos)
    k1, v1 = (k0, v0) if layout == "cla" else (k1, v1)
    want = attention_with_weights(q0, k0, v0, pos, pos)[1] + attention_with_weights(q1, k1, v1, pos, pos)[1]
    assert set(cache.policy.state) == {0} and cache.owner == [0, 0]
    torch.testing.assert_close(cache.policy.state[0], want.sum((1, 2))[:, None])


def test_h2o_over_minicache_keeps_one_selection_per_pair(model):
    cache = make(minicache(policy=H2O(budget=12), start_layer=2, threshold=1.8), model, 2)
    forward_chunks(model, tokens(n=40), cache, 4)
    report = cache.memory_report()
    assert report["evictions"] > 0 and 0 < report["merged_fraction"] < 1
    for a, b in ((2, 3), (4, 5)):
        assert torch.equal(cache.views[a].positions(), cache.views[b].positions())
        real = (cache.views[a].positions() < PAD_POSITION).sum(-1)
        assert (real == 12).all()  # rows keep different retained / merged splits: padded slots are invisible
    assert [cache.views[layer].length for layer in (0, 1)] == [12, 12]


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


def test_cla_search_announces_its_cost():
    from kvcompress.cache.layout.similarity import measure

    class Ctx:
        key, progress, windows = "k", False, torch.zeros(2, 8, dtype=torch.long)

        def kv_samples(self):
            return [(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2), None) for _ in range(4)]

        def nll(self, cache):
            lines.append(f"nll {cache}")
            return 1.0

    lines: list[str] = []
    measure(Ctx(), lambda i: i, "base", lines.append)
    assert lines[0].startswith("[sharing] measuring what sharing costs: 4 NLL passes over 16 tokens")
    assert lines[1:5] == ["nll base", "nll 0", "nll 1", "nll 2"]
