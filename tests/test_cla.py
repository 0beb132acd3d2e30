"""CLA-style cross-layer sharing (layout=cla): groups, validation, exactness, a consumer reading its producer's
history, skipped projections, bytes, storages under it, batch rows, the auto groups' calibration."""
from __future__ import annotations

import pytest
import torch
from conftest import (
    NoRotary,
    cla,
    compose,
    decode_steps,
    prompt,
    random_tokens,
    ready,
    run_chunks,
    spec_of,
    tiny_model,
)

from kvcompress.cache import FullCache
from kvcompress.cache.base import ModelSpec, attention
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.layout.groups import auto_groups, check_groups, producers, uniform_groups
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.engine.generate import forward_chunks
from kvcompress.eval.calibration import Calibration
from kvcompress.eval.data import default_data_dir

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


LAYERS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=LAYERS)


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


@pytest.mark.parametrize("chunk", [1, 7])
def test_groups_of_one_equal_the_full_cache(model, chunk):
    toks = random_tokens()
    torch.testing.assert_close(run_chunks(model, cla(group_size=1), toks, chunk),
                               run_chunks(model, FullCache(), toks, chunk), rtol=0, atol=0)


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

    def spy(x, layer, hi):
        if id(layer) in layer_of and hi > model.layers[layer_of[id(layer)]].attn.q_dim:
            kv_rows.append(layer_of[id(layer)])
        return engine.F.linear(x, layer.weight[:hi], None if layer.bias is None else layer.bias[:hi])

    monkeypatch.setattr(engine, "linear_rows", spy)
    toks = random_tokens()
    skipped = run_chunks(model, cla(group_size=3, skip_projections=True), toks, 8)
    skipped_layers, kv_rows[:] = sorted(set(kv_rows)), []
    computed = run_chunks(model, cla(group_size=3, skip_projections=False), toks, 8)
    torch.testing.assert_close(skipped, computed, rtol=0, atol=0)
    assert skipped_layers == [0, 3] and sorted(set(kv_rows)) == list(range(LAYERS))
    assert not torch.allclose(skipped, run_chunks(model, FullCache(), toks, 8))


def test_cla_bytes_are_the_producers_stores(model):
    toks = random_tokens(n=33)
    full, shared = ready(FullCache(), model, 2), ready(cla(group_size=2), model, 2)
    forward_chunks(model, toks, full, 8)
    forward_chunks(model, toks, shared, 8)
    assert shared.kv_bytes() * 2 == full.kv_bytes()
    assert shared.kv_bytes_fp16() == full.kv_bytes_fp16()
    assert shared.memory_report()["shared_layers"] == 3
    assert shared.memory_report()["kv_bytes_allocated"] * 2 == full.memory_report()["kv_bytes_allocated"]
    per_layer = 2 * 33 * (2 * 2 * 16 * 4 + 4)  # rows x tokens x (K and V fp32 + int32 position)
    assert shared.kv_bytes() == 3 * per_layer and len(shared.views) == LAYERS and len(shared.stores()) == 3


def test_cla_composes_with_int8_storage(model):
    toks = random_tokens(n=64)
    dense = ready(cla(group_size=2), model, 2)
    int8 = ready(cla(QuantizedStore(bits=8, group_size=16), group_size=2), model, 2)
    out_dense, out_int8 = forward_chunks(model, toks, dense, 16), forward_chunks(model, toks, int8, 16)
    assert int8.kv_bytes() < dense.kv_bytes() / 2.5
    assert (out_dense - out_int8).abs().max() < 0.1 * out_dense.abs().max()


@torch.inference_mode()
def test_batch_rows_match_single_rows(model):
    """Against a batch of one (other matmul shapes: last-bit differences, no thresholds to flip)."""
    prompts = [prompt(23, 1), prompt(14, 2)]
    both = decode_steps(model, cla(group_size=2), prompts)
    for row, p in enumerate(prompts):
        for a, b in zip(decode_steps(model, cla(group_size=2), [p]), both, strict=True):
            torch.testing.assert_close(a[0], b[row], rtol=1e-4, atol=1e-4)


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
