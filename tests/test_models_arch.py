"""Qwen2 and Gemma 3 in the engine: exact against transformers on tiny random configs (no downloads), chunked prefill
equal to one shot, sliding windows held by the cache (the model's own semantics), and the axes on such layers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_pair
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress import presets
from kvcompress.cache import ComposedCache, FullCache
from kvcompress.engine.generate import forward_chunks, positions_like
from kvcompress.engine.session import Session

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
    return instantiate(OmegaConf.merge(presets.load(CONF / group / f"{name}.yaml"), settings), _convert_="all")


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


def test_a_padded_row_inside_its_window_is_not_repacked_each_step(pair):
    """Rows of 5 and 3 tokens, under the window: the shorter row's padding slots are hidden, not dropped and padded
    back every step (a store re-packs only when a real token leaves a window or the rows shrink)."""
    model, _ = pair
    cache = ready(FullCache(), model, 2)
    session = Session(model, cache, chunk=4).start(2)
    keeps = []
    for view in cache.views:
        view.keep = lambda idx, keep=view.keep: keeps.append(idx.shape) or keep(idx)
    _, lengths = session.prefill([[1, 2, 3, 4, 5], [6, 7, 8]])
    session.step(torch.tensor([9, 10]), lengths)
    assert keeps == [] and [v.length for v in cache.views] == [6] * len(cache.views)

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


# -- GGUF files of both architectures: metadata and tensor names as llama.cpp writes them -------------------------
def write_gguf(path: Path, hf, arch: str) -> None:
    """The weights of a transformers model as a GGUF file of ``arch`` (fp32 tensors, llama.cpp's names; Gemma's
    norms stored as 1 + w, as llama.cpp's converter stores them)."""
    import gguf

    from kvcompress.engine.gguf_file import GEMMA_LAYER_NAMES, GLOBAL_NAMES, LAYER_NAMES

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    for add, v in ((w.add_context_length, c.max_position_embeddings), (w.add_embedding_length, c.hidden_size),
                   (w.add_block_count, c.num_hidden_layers), (w.add_feed_forward_length, c.intermediate_size),
                   (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                   (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_vocab_size, c.vocab_size),
                   (w.add_rope_freq_base, 1e6 if arch == "gemma3" else 10000.0)):
        add(v)
    if arch == "gemma3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_sliding_window(c.sliding_window)
    names = {hf_name: gguf_name for gguf_name, hf_name in (GEMMA_LAYER_NAMES if arch == "gemma3" else
                                                           LAYER_NAMES).items()}
    globals_ = {hf_name: gguf_name for gguf_name, hf_name in GLOBAL_NAMES.items()}
    for name, t in hf.state_dict().items():
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            _, _, i, part = base.split(".", 3)
            target = f"blk.{i}.{names[part]}"
        elif base in globals_ and not (base == "lm_head" and c.tie_word_embeddings):
            target = globals_[base]
        else:
            continue
        t = t.float() + (1.0 if arch == "gemma3" and base.endswith("norm") else 0.0)
        w.add_tensor(f"{target}.{kind}", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_ARCHS = {"qwen2": QWEN2, "gemma3": {**GEMMA3, "num_hidden_layers": 6, "sliding_window_pattern": 6,
                                         "query_pre_attn_scalar": 256, "final_logit_softcapping": None}}


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_gguf_file_loads_as_transformers_reads_the_model(tmp_path, arch):
    from kvcompress.engine.loaders import load_weights, read_config

    _, hf = tiny_pair(**GGUF_ARCHS[arch])
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, hf, arch)
    config = read_config(path, "g")
    before = dict(vars(config))
    model = load_weights(path, config)
    assert vars(config) == before  # the config given is not modified
    assert config.tie_embeddings == hf.config.tie_word_embeddings
    toks = tokens(n=24)
    with torch.inference_mode():
        ref = hf(toks).logits
    assert (forward_chunks(model, toks, ready(FullCache(), model, 2), chunk=5) - ref).abs().max() < TOL


def test_bf16_weights_run_on_cpu(tmp_path):
    from kvcompress.engine.loaders import load_weights, read_config

    _, hf = tiny_pair(**QWEN2)
    path = tmp_path / "q.gguf"
    write_gguf(path, hf, "qwen2")
    model = load_weights(path, read_config(path, "g"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    toks = tokens(n=24)
    with torch.inference_mode():
        ref = hf(toks).logits
    out = forward_chunks(model, toks, ready(FullCache(), model, 2), chunk=8).float()
    assert torch.isfinite(out).all() and (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_a_truncated_or_wrong_model_file_is_refused_by_name(tmp_path):
    import hashlib

    from kvcompress.engine.assets import Asset, check_file

    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 100)
    good = Asset("m.gguf", hashlib.sha256(b"x" * 100).hexdigest(), 100, (), "test")
    check_file(path, good)
    with pytest.raises(ValueError, match=rf"model file {path} has 100 bytes, expected 200 \(truncated or wrong\)"):
        check_file(path, Asset("m.gguf", good.sha256, 200, (), "test"))
    with pytest.raises(ValueError, match=rf"model file {path}: sha256 .* differs from the published"):
        check_file(path, Asset("m.gguf", "0" * 64, 100, (), "test"))


@pytest.mark.parametrize("storage,policy,layout", [
    ("int4", "h2o", "per_layer"), ("kivi", "snapkv", "per_layer"), ("fp8", "tova", "per_layer"),
    ("dense", "streaming", "per_layer"), ("int8", "adakv", "per_layer")])
def test_the_contract_invariants_hold_on_each_architecture(pair, storage, policy, layout, tmp_path):
    """kvcompress.testing's invariants (finite logits, exact byte accounting, positions, rows independent, ...) on
    the tiny Qwen2 and Gemma 3 (windowed layers) models, not only on the tiny Llama of the contract matrix (sharing
    layouts over Gemma's mixed windows are refused: test_sharing_layouts_refuse_mixed_windows)."""
    from kvcompress.testing.contract import Axes, check_combination

    model, _ = pair
    real = {"kivi": dict(residual=8, group_size=8), "snapkv": dict(window=4),
            "adakv": dict(recent=4, scorer=dict(window=4))}
    node = lambda group, name: OmegaConf.merge(presets.load(CONF / group / f"{name}.yaml"), real.get(name, {}),  # noqa: E731
                                               {"budget": 0.5} if group == "policy" else {})
    axes = Axes(node("storage", storage), node("policy", policy), node("layout", layout))
    assert check_combination(axes, model, tmp_path) == "ran"
