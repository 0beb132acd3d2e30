"""What every sharing layout (CLA, MiniCache) keeps: settings checked before weights load, batch rows independent,
a policy scoring a shared or merged store with every layer that reads it."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from conftest import (
    STORIES,
    NoRotary,
    cla,
    compose,
    decode_steps,
    minicache,
    prompt,
    spec_of,
    tiny_model,
)

from kvcompress.cache.base import ModelSpec, attention_weights
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.layout.minicache import MiniCache
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.storage.quant.store import QuantizedStore

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


LAYERS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_hidden_layers=LAYERS)


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


def test_kvc_refuses_bad_sharing_settings_before_loading(tmp_path):
    """Through the app, on a model folder without weights: the setting's error comes first."""

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
    want = attention_weights(q0, k0, pos, pos) + attention_weights(q1, k1, pos, pos)
    assert set(cache.policy.state) == {0} and cache.owner == [0, 0]
    torch.testing.assert_close(cache.policy.state[0], want.sum((1, 2))[:, None])
