"""The contract of the three axes: every conf/storage x conf/policy x conf/layout YAML, on a tiny random Llama,
through the public suite ``kvcompress.testing`` (the same checks a user runs on their own class).

Each combination keeps the design brief's invariants: exact accounting (``kv_bytes`` is the real tensors,
``kv_bytes_allocated`` the distinct allocations behind them), batch rows independent, positions never
renumbered, finite output, and a real setting on an axis holds fewer bytes than that axis's identity; or it is
refused as its axes declare. Identity settings reduce a combination to the other axes exactly; a captured form,
where there is one, gives the eager logits. What a method can do comes from its class's declarations.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hydra.utils import get_class
from omegaconf import OmegaConf

from kvcompress.cache.policy.captured import slot_addressable
from kvcompress.testing import (
    Axes,
    build,
    check_combination,
    check_policy_identity,
    check_static_form,
    drive,
    refusal,
    tokens,
)
from kvcompress.testing.contract import load, make

CONF = Path(__file__).resolve().parents[1] / "conf"
AXES = ("storage", "policy", "layout")
NAMES = {axis: sorted(p.stem for p in (CONF / axis).glob("*.yaml")) for axis in AXES}

# settings that make each choice do real work on a 4-layer, head_dim-32, 40 + 8 token test
REAL = {
    "storage": {"kivi": dict(residual=8, group_size=8), "rotated_kivi": dict(residual=8, group_size=8),
                "bnb_int8": dict(blocksize=32),
                "bnb_nf4": dict(blocksize=32), "bnb_fp4": dict(blocksize=32),
                # RandomCalibration cannot run the model: no query moments, so key-only / unweighted calibration
                "think": dict(score="key"), "kvquant": dict(sensitivity="none"),
                "gear": dict(group_size=8, block_size=16, residual=8),
                # the YAML's 128-token hot window would leave a 48-token test uncoded
                "kvtc": dict(residual=8, block_size=8, sink=2)},
    "policy": {name: dict(budget=0.5) for name in NAMES["policy"] if name != "none"}
    | {"snapkv": dict(budget=0.5, window=4), "pyramid": dict(budget=0.5, window=4, beta=2),
       "adakv": dict(budget=0.5, recent=4, scorer=dict(window=4)), "chunkkv": dict(budget=0.5, recent=4, chunk=4,
                                                                                  scorer=dict(window=4)),
       "duo_attention": dict(budget=0.5, probe_recent=4),
       # (B, Hq, D, D) query moments outweigh 24 evicted tokens of this tiny model; kvzip replays only in prefill()
       "expected_attention": dict(budget=0.5, covariance=False), "kvzip": dict(budget=0.5, when="decode")},
    "layout": {"minicache": dict(start_layer=0, threshold=math.pi), "cla": dict(group_size=2),
               "xkv": dict(group_size=2)},
}
IDENTITY_SETTING = {"layout": {"minicache": dict(start_layer=0, threshold=0.0), "cla": dict(groups=[])}}


def node(axis: str, name: str, **settings):
    """The YAML of an axis with the test's real settings, as a config node (``None`` for policy=none's identity)."""
    return OmegaConf.merge(load(CONF / axis / f"{name}.yaml"), REAL[axis].get(name, {}), settings)


def declares(policy: str, capability: str) -> bool:
    """A capability the policy's class declares (``EvictionPolicy.uneven_heads`` ...), read from its YAML's target."""
    return bool(getattr(get_class(node("policy", policy)._target_), capability, False))


def combination(storage: str, policy: str, layout: str, settings: dict | None = None) -> Axes:
    """The three YAMLs; a policy keeping uneven heads over a latent across heads gets ``storage.per_head=true``
    (the storage's setting that holds ragged heads)."""
    settings = settings or {}
    extra = {"per_head": True} if storage == "latent" and declares(policy, "uneven_heads") else {}
    return Axes(node("storage", storage, **extra, **settings.get("storage", {})),
                node("policy", policy, **settings.get("policy", {})),
                node("layout", layout, **settings.get("layout", {})))


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration")


COMBOS = [(s, p, lay) for s in NAMES["storage"] for p in NAMES["policy"] for lay in NAMES["layout"]]


@pytest.mark.parametrize("storage,policy,layout", COMBOS)
def test_contract(model, calib_dir, storage, policy, layout):
    outcome = check_combination(combination(storage, policy, layout), model, calib_dir)
    if layout == "xkv":  # layout=xkv shares calibrations: it refuses a storage that does not calibrate, by design
        if not getattr(get_class(node("storage", storage)._target_), "group_calibration", False):
            assert outcome != "ran", outcome
        else:  # a storage that calibrates in groups runs, unless the policy refuses it (CaM over latents)
            assert outcome == "ran" or "xkv" not in outcome, outcome
    elif storage == "dense" and layout == "per_layer":
        assert outcome == "ran", outcome  # every policy runs over the identities


@pytest.mark.parametrize("storage", NAMES["storage"])
@pytest.mark.parametrize("policy,layout", [("kvzip", "per_layer"), ("kvzip", "cla"), ("kvcompose", "per_layer")])
def test_kvzip_group_mean_state_composes(model, calib_dir, storage, policy, layout):
    """KVzip's ``group=mean`` keeps a (B, Hkv, G, T) per-token state: the contract holds with it, evicting every
    step (kvzip, when=decode) and ranked once with heads keeping their own tokens (KVCompose over it)."""
    scorer = {"scorer": OmegaConf.merge(load(CONF / "policy" / "scorer" / "kvzip.yaml"), {"group": "mean"})}
    settings = {"policy": {"group": "mean"} if policy == "kvzip" else scorer}
    outcome = check_combination(combination(storage, policy, layout, settings), model, calib_dir)
    if storage == "dense":
        assert outcome == "ran", outcome


@pytest.mark.parametrize("storage,policy,layout", [c for c in COMBOS if c[1] != "none"])
def test_policy_budget_above_window_is_no_policy(model, calib_dir, storage, policy, layout):
    axes = combination(storage, policy, layout)
    if refusal(axes, model, calib_dir):
        pytest.skip("refused by design (test_contract)")
    check_policy_identity(axes, model, calib_dir)


@pytest.mark.parametrize("policy,layout", [(p, "cla") for p in NAMES["policy"]] + [("none", "minicache")])
def test_layout_identity_setting_is_per_layer(model, calib_dir, policy, layout):
    """CLA without groups is per_layer under any policy; MiniCache retaining every token is per_layer without a
    policy (under one, a pair keeps one selection for both its layers, by design: merged tokens are shared)."""
    toks = tokens(3)
    ref = drive(model, build(model, combination("dense", policy, "per_layer"), calib_dir), toks)
    out = drive(model, build(model, combination("dense", policy, layout,
                                                {"layout": IDENTITY_SETTING["layout"][layout]}), calib_dir), toks)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_h2o_over_minicache_merges_and_scores_both_layers(model, calib_dir):
    """The case that ran silently wrong before the axes: eviction over merged pairs."""
    cache = build(model, combination("dense", "h2o", "minicache"), calib_dir)
    drive(model, cache, tokens(4))
    report = cache.memory_report()
    assert report["merged_fraction"] == 1.0 and report["evictions"] > 0
    assert cache.views[0].length == cache.views[1].length <= math.ceil(0.5 * 48)


def test_per_head_needs_ragged_storage(model, calib_dir):
    with pytest.raises(ValueError, match="per_head"):
        build(model, combination("latent", "snapkv", "per_layer", {"policy": dict(per_head=True)}), calib_dir)
    build(model, combination("latent", "snapkv", "per_layer", {"storage": dict(per_head=True),
                                                               "policy": dict(per_head=True)}), calib_dir)


def has_static_form(storage: str, policy: str, layout: str) -> bool:
    """Which combinations decode on the captured (graph) path (README "Speed"), from what the axes declare: the
    identity layout, and a storage's own captured form (no policy), or a policy declaring ``captured`` over a
    storage whose captured form is slot-addressable."""
    if layout != "per_layer":
        return False
    store = make(node("storage", storage), "storage")
    if policy == "none":
        return store.static_form(48) is not None
    return declares(policy, "captured") and slot_addressable(store.static_form(1))


@pytest.mark.parametrize("storage,policy,layout", COMBOS)
def test_static_form_is_the_eager_cache(model, calib_dir, storage, policy, layout):
    """Every combination either has no captured form (eager decode) or one whose logits equal the eager cache's
    (``check_static_form``); which have one follows from the declarations (``has_static_form``)."""
    axes = combination(storage, policy, layout)
    if refusal(axes, model, calib_dir):
        pytest.skip("refused by design (test_contract)")
    assert check_static_form(axes, model, calib_dir) == has_static_form(storage, policy, layout)
