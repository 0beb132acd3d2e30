"""Qwen2 and Gemma 3 in the engine: exact against transformers on tiny random configs (no downloads), chunked prefill
equal to one shot, sliding windows held by the cache (the model's own semantics), and the axes on such layers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_pair
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.engine.generate import forward_chunks, positions_like

CONF = Path(__file__).resolve().parents[1] / "conf"
TOL = 1e-4  # fp32 logits, max abs difference (observed ~4e-7: summation order only)
QWEN2 = dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=False)
# Gemma 3 at toy size: windows of 8 on every other layer, their own RoPE base, q/k norm, pre + post norms, GELU-tanh,
# a query scale other than head_dim ** -0.5, and final logit softcapping
GEMMA3 = dict(model_type="gemma3_text", head_dim=16, num_hidden_layers=4, sliding_window=8, sliding_window_pattern=2,
              query_pre_attn_scalar=24, rope_theta=1e6, rope_local_base_freq=10000.0, final_logit_softcapping=5.0,
              hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, rms_norm_eps=1e-6)
ARCHS = {"qwen2": QWEN2, "gemma3": GEMMA3}


def tokens(batch: int = 2, n: int = 40, seed: int = 1):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def ready(cache, model, batch: int):
    cache.setup(model.config.spec())
    cache.reset(batch)
    return cache


def axis(group: str, name: str, **settings):
    return instantiate(OmegaConf.merge(OmegaConf.load(CONF / group / f"{name}.yaml"), settings), _convert_="all")


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request):
    torch.set_num_threads(1)
    return tiny_pair(**ARCHS[request.param])


def test_logits_equal_transformers(pair):
    model, hf = pair
    toks = tokens()
    with torch.inference_mode():
        ref = hf(toks).logits
        ours = model(toks, positions_like(toks), ready(FullCache(), model, 2))
    assert (ours - ref).abs().max() < TOL


def test_gemma3_config_is_read_as_transformers_reads_it():
    model, hf = tiny_pair(**GEMMA3)
    c = model.config
    assert c.layer_windows == [8 if t == "sliding_attention" else None for t in hf.config.layer_types] == [8, None] * 2
    assert (c.local_rope_theta, c.rope_theta, c.final_softcap, c.norm_offset) == (10000.0, 1e6, 5.0, 1.0)
    assert model.layer_ropes[0] is not model.rope and model.layer_ropes[1] is model.rope


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_one_shot(pair, chunk):
    """Multi-token chunks longer than the window mask the band; single tokens see exactly the trimmed store."""
    model, hf = pair
    toks = tokens(n=40)
    with torch.inference_mode():
        ref = hf(toks).logits
    cache = ready(FullCache(), model, 2)
    stepped = forward_chunks(model, toks, cache, chunk=chunk)
    assert (stepped - ref).abs().max() < TOL
    windows = model.config.layer_windows or [None] * model.config.num_layers
    assert [v.length for v in cache.views] == [40 if w is None else w - 1 for w in windows]


def test_memory_report_shows_the_windowed_full_cache_and_the_plain_one():
    model, _ = tiny_pair(**GEMMA3)
    cache = ready(FullCache(), model, 2)
    forward_chunks(model, tokens(n=40), cache, chunk=16)
    spec, report = model.config.spec(), cache.memory_report()
    per_token_layer = 2 * 2 * spec.num_kv_heads * spec.head_dim
    assert report["kv_bytes_fp16_no_window"] == per_token_layer * 4 * 2 * 40
    assert report["kv_bytes_fp16"] == per_token_layer * 2 * (2 * 40 + 2 * 7)  # 2 global layers, 2 of window 8
    assert cache.kv_bytes() == sum(t.nbytes for t in cache.tensors())


@pytest.mark.parametrize("storage,policy", [("int8", "none"), ("kivi", "h2o"), ("int4", "snapkv"),
                                            ("dense", "streaming")])
def test_composed_caches_run_and_stay_finite(pair, storage, policy):
    model, _ = pair
    settings = {"budget": 12, "sinks": 2} if policy == "streaming" else {"budget": 12}
    cache = ComposedCache(axis("storage", storage, **({"residual": 4} if storage == "kivi" else {})),
                          axis("policy", policy, **(settings if policy != "none" else {})))
    logits = forward_chunks(model, tokens(n=40), ready(cache, model, 2), chunk=8)
    assert torch.isfinite(logits).all()
    windows = model.config.layer_windows or [None] * model.config.num_layers
    for view, window in zip(cache.views, windows, strict=True):
        assert view.length <= (12 if policy != "none" else 40) and (window is None or view.length <= window - 1)


def test_identity_axes_equal_the_full_cache(pair):
    model, _ = pair
    toks = tokens(n=40)
    full = forward_chunks(model, toks, ready(FullCache(), model, 2), chunk=8)
    identity = ComposedCache(axis("storage", "dense"), axis("policy", "none"), axis("layout", "per_layer"))
    assert torch.equal(forward_chunks(model, toks, ready(identity, model, 2), chunk=8), full)


def test_policy_budget_above_the_window_is_a_no_op_there():
    """H2O with a budget of 20 tokens: global layers (40 tokens) evict, the window-8 layers (7 held) do not."""
    model, _ = tiny_pair(**GEMMA3)
    toks = tokens(n=40)
    cache = ready(ComposedCache(policy=axis("policy", "h2o", budget=20)), model, 2)
    forward_chunks(model, toks, cache, chunk=8)
    assert [v.length for v in cache.views] == [7, 20, 7, 20]
    big = forward_chunks(model, toks, ready(ComposedCache(policy=axis("policy", "h2o", budget=10_000)), model, 2), 8)
    assert torch.equal(big, forward_chunks(model, toks, ready(FullCache(), model, 2), chunk=8))


def test_sharing_layouts_refuse_mixed_windows():
    model, _ = tiny_pair(**GEMMA3)
    cache = ComposedCache(layout=axis("layout", "cla"))
    with pytest.raises(ValueError, match="mixes sliding-window and global layers.*layout=per_layer"):
        cache.setup(model.config.spec())


def test_mistral_windows_use_the_same_mechanism():
    model, hf = tiny_pair(model_type="mistral", sliding_window=8)
    toks = tokens(n=40)
    with torch.inference_mode():
        ref = hf(toks).logits
    cache = ready(FullCache(), model, 2)
    assert (forward_chunks(model, toks, cache, chunk=1) - ref).abs().max() < TOL
    assert {v.length for v in cache.views} == {7}
