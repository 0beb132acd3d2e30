"""The contract of the three axes: every conf/storage x conf/policy x conf/layout YAML, on a tiny random Llama.

Each combination must keep the design brief's invariants: exact accounting (``kv_bytes`` is the real tensors,
``kv_bytes_allocated`` the distinct allocations behind them), batch rows independent, positions never
renumbered, finite output, and a real setting on an axis holds fewer bytes than that axis's identity.
Identity settings reduce a combination to the other axes exactly.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import spec_of, tiny_model
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.cache import PAD_POSITION, ComposedCache
from kvcompress.engine.generate import forward_chunks, positions_like

CONF = Path(__file__).resolve().parents[1] / "conf"
AXES = ("storage", "policy", "layout")
NAMES = {axis: sorted(p.stem for p in (CONF / axis).glob("*.yaml")) for axis in AXES}
IDENTITY = {"storage": "dense", "policy": "none", "layout": "per_layer"}
NEEDS_WEIGHTS = {"h2o", "snapkv", "tova", "pyramid", "adakv", "chunkkv", "kvzip", "cam"}
PER_HEAD_POLICIES = {"adakv", "duo_attention"}  # different token counts per KV head: latent needs per_head=true

# settings that make each choice do real work on a 4-layer, head_dim-32, 40 + 8 token test
REAL = {
    "storage": {"kivi": dict(residual=8, group_size=8), "bnb_int8": dict(blocksize=32),
                "bnb_nf4": dict(blocksize=32), "bnb_fp4": dict(blocksize=32),
                # RandomCalibration cannot run the model: no query moments, so key-only / unweighted calibration
                "think": dict(score="key"), "kvquant": dict(sensitivity="none"),
                "gear": dict(group_size=8, block_size=16, residual=8)},
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
IDENTITY_SETTING = {"policy": dict(budget=10_000), "layout": {"minicache": dict(start_layer=0, threshold=0.0),
                                                              "cla": dict(groups=[])}}


class RandomCalibration:
    """A calibration context for storages that calibrate (latent): random K/V samples, no engine needed."""

    def __init__(self, spec, tmp: Path):
        self.spec, self.cache_dir, self.key, self.progress, self.rope = spec, str(tmp), "tiny-random", False, None

    def retrieval_nll(self, cache):  # DuoAttention's probe: a random head split is enough for the contract
        self.calls = getattr(self, "calls", 0) + 1
        return float(torch.rand((), generator=torch.Generator().manual_seed(self.calls)))

    def kv_samples(self):
        g = torch.Generator().manual_seed(0)
        shape = (1, self.spec.num_kv_heads, 256, self.spec.head_dim)
        return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.arange(256)[None])
                for _ in range(self.spec.num_layers)]


def load(group: str, name: str):
    """A YAML of an axis, with its nested group defaults (``- scorer: snapkv`` -> conf/policy/scorer/snapkv.yaml)."""
    cfg = OmegaConf.load(CONF / group / f"{name}.yaml")
    for entry in cfg.pop("defaults", []):
        if isinstance(entry, str):
            continue  # _self_
        (sub, choice), = entry.items()
        cfg = OmegaConf.merge({sub: load(f"{group}/{sub}", choice)}, cfg)
    return cfg


def axis(group: str, name: str, **settings):
    cfg = load(group, name)
    cfg = OmegaConf.merge(cfg, REAL[group].get(name, {}), settings)
    return instantiate(cfg, _convert_="all")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration")


def build(model, calib_dir, storage, policy, layout, overrides=None):
    overrides = overrides or {}
    if policy in PER_HEAD_POLICIES and storage == "latent":
        overrides = {**overrides, "storage": {"per_head": True, **overrides.get("storage", {})}}
    cache = ComposedCache(**{a: axis(a, n, **overrides.get(a, {})) for a, n in zip(AXES, (storage, policy, layout),
                                                                                   strict=True)})
    cache.setup(spec_of(model))
    cache.calibrate(RandomCalibration(spec_of(model), calib_dir))
    return cache


def drive(model, cache, toks, prompt=40):
    """Prefill ``prompt`` tokens in chunks of 8, then decode the rest one token at a time; all logits."""
    cache.reset(toks.shape[0])
    out = [forward_chunks(model, toks[:, :prompt], cache, 8)]
    with torch.inference_mode():
        for t in range(prompt, toks.shape[1]):
            out.append(model(toks[:, t : t + 1], positions_like(toks[:, t : t + 1], t), cache))
    return torch.cat(out, 1)


def tokens(seed: int, batch: int = 2, n: int = 48):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def refused(storage: str, layout: str) -> bool:
    """Combinations refused by design: layout=xkv shares calibrations, so it needs a storage that calibrates."""
    return layout == "xkv" and not axis("storage", storage).group_calibration


def policy_refused(storage: str, policy: str, layout: str) -> str | None:
    """Refused by design, with the error's words: CaM rewrites values (not in a latent, not in a MiniCache pair);
    AdaKV and DuoAttention pad per-head counts, which a MiniCache pair's re-packing cannot hold."""
    if policy == "cam" and (storage == "latent" or layout == "minicache"):
        return "policy=cam"
    if policy in PER_HEAD_POLICIES and layout == "minicache":
        return "different number of tokens per KV head"
    return None


def per_head_storage(storage: str, policy: str) -> dict | None:
    return {"storage": {"per_head": True}} if policy in PER_HEAD_POLICIES and storage == "latent" else None


COMBOS = [(s, p, lay) for s in NAMES["storage"] for p in NAMES["policy"] for lay in NAMES["layout"]]
RUNNABLE = [c for c in COMBOS if not refused(c[0], c[2])]


@pytest.mark.parametrize("storage,policy,layout", COMBOS)
def test_contract(model, calib_dir, storage, policy, layout):
    if refused(storage, layout):  # before weights load, naming both choices
        with pytest.raises(ValueError, match=r"layout=xkv .* storage"):
            build(model, calib_dir, storage, policy, layout)
        return
    if why := policy_refused(storage, policy, layout):  # at setup, or at the first eviction
        with pytest.raises(ValueError, match=why):
            drive(model, build(model, calib_dir, storage, policy, layout), tokens(0))
        return
    cache = build(model, calib_dir, storage, policy, layout)
    toks = tokens(0)
    out = drive(model, cache, toks)
    assert torch.isfinite(out).all()
    # exact accounting: real tensors, and no saving faked with views of a larger buffer
    held = cache.kv_bytes()
    assert held == sum(t.nbytes for t in cache.tensors()) and 0 < held <= cache.kv_bytes_allocated()
    # positions are never renumbered: every held position was appended, none twice in a row (or head)
    for view in cache.stores():
        pos = view.positions()
        pos = pos[:, None] if pos.dim() == 2 else pos
        for row in pos.flatten(0, 1).tolist():
            real = [p for p in row if p < PAD_POSITION]
            assert len(real) == len(set(real)) and all(0 <= p < toks.shape[1] for p in real)
    # batch rows are independent: row 0's logits do not depend on row 1
    other = toks.clone()
    other[1] = tokens(1)[1]
    again = drive(model, build(model, calib_dir, storage, policy, layout), other)
    # AdaKV / DuoAttention pad every head to the batch's fullest head: the slot count is shared by the rows, so a
    # storage that quantizes groups of tokens (KIVI's key channels), or rounds differently at another matmul shape
    # and flips a code, sees the other row; exact row independence is asserted for dense storage
    if policy not in PER_HEAD_POLICIES or storage == "dense":
        torch.testing.assert_close(again[0], out[0], rtol=0, atol=1e-5)
    # every real setting holds fewer bytes (and allocates fewer) than its axis's identity
    chosen = dict(zip(AXES, (storage, policy, layout), strict=True))
    for a in AXES:
        if chosen[a] == IDENTITY[a] or refused(**{k: v for k, v in {**chosen, a: IDENTITY[a]}.items()
                                                                if k != "policy"}):
            continue
        plain = build(model, calib_dir, **{**chosen, a: IDENTITY[a]})
        drive(model, plain, toks)
        if chosen[a] == "xkv":  # a shared basis: the same latents per token, one basis per group of layers
            assert held == plain.kv_bytes() and cache.calibration_bytes() < plain.calibration_bytes()
            continue
        assert held < plain.kv_bytes(), f"{a}={chosen[a]} saves nothing"
        assert cache.kv_bytes_allocated() < plain.kv_bytes_allocated(), f"{a}={chosen[a]} frees no allocation"


@pytest.mark.parametrize("storage,policy,layout", [c for c in RUNNABLE if c[1] != "none" and not policy_refused(*c)])
def test_policy_budget_above_window_is_no_policy(model, calib_dir, storage, policy, layout):
    toks = tokens(2)
    ref = drive(model, build(model, calib_dir, storage, "none", layout, per_head_storage(storage, policy)), toks)
    cache = build(model, calib_dir, storage, policy, layout, {"policy": IDENTITY_SETTING["policy"]})
    out = drive(model, cache, toks)
    assert cache.policy.evictions == 0 and torch.equal(out, ref)
    if storage == "dense":  # a budget above this text but below max_position: scores are kept, nothing is evicted
        cache = build(model, calib_dir, storage, policy, layout, {"policy": dict(budget=100)})
        out = drive(model, cache, toks)
        assert cache.policy.evictions == 0
        # weights come from an explicit softmax instead of SDPA: rounding only
        torch.testing.assert_close(out, ref, rtol=0, atol=5e-5 if policy in NEEDS_WEIGHTS else 0)


@pytest.mark.parametrize("policy,layout", [(p, "cla") for p in NAMES["policy"]] + [("none", "minicache")])
def test_layout_identity_setting_is_per_layer(model, calib_dir, policy, layout):
    """CLA without groups is per_layer under any policy; MiniCache retaining every token is per_layer without a
    policy (under one, a pair keeps one selection for both its layers, by design: merged tokens are shared)."""
    toks = tokens(3)
    ref = drive(model, build(model, calib_dir, "dense", policy, "per_layer"), toks)
    out = drive(model, build(model, calib_dir, "dense", policy, layout,
                             {"layout": IDENTITY_SETTING["layout"][layout]}), toks)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_h2o_over_minicache_merges_and_scores_both_layers(model, calib_dir):
    """The case that ran silently wrong before the axes: eviction over merged pairs."""
    cache = build(model, calib_dir, "dense", "h2o", "minicache")
    drive(model, cache, tokens(4))
    report = cache.memory_report()
    assert report["merged_fraction"] == 1.0 and report["evictions"] > 0
    assert cache.views[0].length == cache.views[1].length <= math.ceil(0.5 * 48)


def test_per_head_needs_ragged_storage(model, calib_dir):
    cache = ComposedCache(axis("storage", "latent"), axis("policy", "snapkv", per_head=True),
                          axis("layout", "per_layer"))
    with pytest.raises(ValueError, match="per_head"):
        cache.setup(spec_of(model))
    cache = ComposedCache(axis("storage", "latent", per_head=True), axis("policy", "snapkv", per_head=True),
                          axis("layout", "per_layer"))
    cache.setup(spec_of(model))


STATIC_STORAGES = {"dense", "int8", "int4", "int2", "kivi", "latent"}  # a static-capacity form of their own
SLOT_STORAGES = {"dense", "int8", "int4", "int2"}  # ... written at any slot: a fixed-budget policy can hold them
STATIC_POLICIES = {"h2o", "tova", "streaming", "knorm", "keydiff"}  # per-slot scores in fixed shapes


def has_static_form(storage: str, policy: str, layout: str) -> bool:
    """Which combinations decode on the captured (graph) path: README "Speed"."""
    if layout != "per_layer":
        return False
    if policy == "none":
        return storage in STATIC_STORAGES
    return policy in STATIC_POLICIES and storage in SLOT_STORAGES


@pytest.mark.parametrize("storage,policy,layout", [c for c in RUNNABLE if not policy_refused(*c)])
def test_static_form_is_the_eager_cache(model, calib_dir, storage, policy, layout):
    """Every combination either has no static form (eager decode) or one whose logits equal the eager cache's over
    a chunked prefill and decode (codes can round the other way on fp noise: 1e-4). No token repeats in a row: key
    norms are rotation-invariant, so a repeated token ties with itself in layer 0 and eager ``topk`` and the static
    form's stable sort may keep different copies (both right)."""
    cache = build(model, calib_dir, storage, policy, layout)
    static = cache.static_form(48)
    assert (static is not None) == has_static_form(storage, policy, layout)
    if static is None:
        return
    static.setup(spec_of(model))
    g = torch.Generator().manual_seed(5)
    toks = torch.stack([torch.randperm(97, generator=g)[:48] for _ in range(2)])
    torch.testing.assert_close(drive(model, static, toks), drive(model, cache, toks), rtol=1e-4, atol=1e-4)
