"""The engine is exact: logits equal transformers, and cached decode equals one full forward pass."""
import pytest
import torch
from conftest import tiny_pair

from kvcompress.cache import PAD_POSITION, FullCache
from kvcompress.cache.storage.dense import StaticKVCache
from kvcompress.engine.generate import Sampling, forward_chunks, generate, positions_like, prefill

VARIANTS = {
    "gqa": {},
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
    "qkv_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "rope_llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen2": dict(model_type="qwen2"),
    "qwen3_qk_norm": dict(model_type="qwen3", head_dim=32),
}


def full_cache(model, batch=1):
    cache = FullCache()
    cache.setup(model.config.spec())
    cache.reset(batch)
    return cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant):
    model, hf = tiny_pair(**VARIANTS[variant])
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(tokens).logits
        ours = model(tokens, positions_like(tokens), full_cache(model, 2))
    assert (ours - ref).abs().max() < 1e-4


def test_stories260k_matches_transformers(stories, story_tokens):
    from conftest import STORIES
    from transformers import LlamaForCausalLM

    model, _ = stories
    hf = LlamaForCausalLM.from_pretrained(STORIES).eval()
    tokens = story_tokens[:, :256]
    with torch.inference_mode():
        ref = hf(tokens).logits
        ours = model(tokens, positions_like(tokens), full_cache(model))
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_and_decode_equal_one_forward(chunk):
    model, _ = tiny_pair()
    tokens = torch.randint(0, 97, (3, 64), generator=torch.Generator().manual_seed(2))
    once = forward_chunks(model, tokens, full_cache(model, 3))
    stepped = forward_chunks(model, tokens, full_cache(model, 3), chunk=chunk)
    assert (once - stepped).abs().max() < 1e-5


@torch.inference_mode()
def test_positions_advanced_in_place_rotate_at_their_new_values():
    """The rotary cos/sin are computed once per forward (``prepare``), never served from an earlier forward's
    positions tensor whose values changed in place (a captured step's static buffer): the keys stored equal
    those of fresh positions tensors, bit for bit."""
    model, _ = tiny_pair()
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    reused, fresh = StaticKVCache(capacity=9), StaticKVCache(capacity=9)
    for cache in (reused, fresh):
        cache.setup(model.config.spec())
        cache.reset(2)
    pos = torch.zeros((2, 1), dtype=torch.long)
    a, b = [], []
    for i in range(9):
        pos.fill_(i)
        a.append(model(tokens[:, i : i + 1], pos, reused))
    for i in range(9):
        b.append(model(tokens[:, i : i + 1], torch.full((2, 1), i), fresh))
    assert all(torch.equal(x, y) for x, y in zip(reused.payload(), fresh.payload(), strict=True))
    assert torch.equal(torch.cat(a, 1), torch.cat(b, 1))


def test_padding_is_never_attended():
    """Right-padded prompts of different lengths give each row's own unpadded logits."""
    model, _ = tiny_pair()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    last, nxt = prefill(model, prompts, full_cache(model, 2), chunk=4)
    for i, p in enumerate(prompts):
        t = torch.tensor([p])
        alone = forward_chunks(model, t, full_cache(model))[0, -1]
        assert (alone - last[i]).abs().max() < 1e-5
    assert nxt.tolist() == [6, 3]


def test_pad_position_keys_hidden_from_real_queries():
    model, _ = tiny_pair()
    cache = full_cache(model)
    t = torch.tensor([[1, 2, 3, 4]])
    pos = torch.tensor([[0, 1, PAD_POSITION, PAD_POSITION]])
    with torch.inference_mode():
        padded = model(t, pos, cache)[0, :2]
    alone = forward_chunks(model, t[:, :2], full_cache(model))[0]
    assert (padded - alone).abs().max() < 1e-5
    assert cache.tokens_seen == 2


def test_greedy_generation_matches_transformers():
    model, hf = tiny_pair()
    prompt = [3, 14, 15, 92, 65]
    ours = generate(model, [prompt], full_cache(model), max_new_tokens=12)[0]
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                          pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == ref


def test_batched_generation_equals_one_at_a_time_and_stops():
    model, _ = tiny_pair()
    prompts = [[3, 14, 15], [92, 65, 35, 89, 79]]
    batched = generate(model, prompts, full_cache(model), max_new_tokens=8)
    single = [generate(model, [p], full_cache(model), max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    stop = batched[0][2]
    alone = generate(model, prompts[:1], full_cache(model), 8, stop_ids=[stop])[0]
    assert alone == batched[0][: batched[0].index(stop) + 1]


def test_sampling_is_seeded_and_respects_top_k():
    model, _ = tiny_pair()
    s = Sampling(temperature=1.0, top_k=1)
    greedy = generate(model, [[1, 2, 3]], full_cache(model), 6)
    assert generate(model, [[1, 2, 3]], full_cache(model), 6, sampling=s, seed=0) == greedy
    s = Sampling(temperature=1.5, top_p=0.9)
    a = generate(model, [[1, 2, 3]], full_cache(model), 6, sampling=s, seed=3)
    assert a == generate(model, [[1, 2, 3]], full_cache(model), 6, sampling=s, seed=3)


def test_kv_bytes_are_the_real_tensors():
    model, _ = tiny_pair()
    cache = full_cache(model, 2)
    forward_chunks(model, torch.randint(0, 97, (2, 21)), cache, chunk=5)
    real = sum(t.nbytes for s in cache.stores() for t in (*s.parts.view().values(), s.pos.view()))
    assert cache.kv_bytes() == real
    c = model.config
    assert cache.tokens_seen == 42
    assert cache.kv_bytes_fp16() == 2 * 2 * c.num_layers * c.num_kv_heads * c.head_dim * 42
    # fp32 K/V are twice the fp16 reference, plus 4-byte positions per token and layer
    assert cache.kv_bytes() == 2 * cache.kv_bytes_fp16() + 4 * 42 * c.num_layers
    assert cache.kv_bytes_allocated() >= cache.kv_bytes()


def test_unsupported_architecture_is_refused():
    from kvcompress.engine.config import ModelConfig

    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        tiny_pair(rope_scaling={"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_fp32(dtype):
    model, _ = tiny_pair()
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = forward_chunks(model, tokens, full_cache(model, 2))
    half = model.to(dtype)
    out = forward_chunks(half, tokens, full_cache(half, 2), chunk=5)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_several_row_products_in_fp32_equal_the_native_half_gemm(dtype, monkeypatch):
    """Where the CPU's bf16/fp16 GEMM is slow, products of several rows run in fp32 (``model.linear``): the
    logits equal the native half-precision GEMM's up to its rounding (both accumulate in fp32), biases included."""
    import kvcompress.engine.model as engine_model

    model = tiny_pair(attention_bias=True, mlp_bias=True)[0].to(dtype)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    monkeypatch.setitem(engine_model.SLOW_CPU_HALF, dtype, False)
    native = model(tokens, positions_like(tokens), full_cache(model, 2))
    monkeypatch.setitem(engine_model.SLOW_CPU_HALF, dtype, True)
    widened = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(engine_model.F, "linear", lambda x, w, b=None: widened.append(x.dtype) or linear(x, w, b))
    up = model(tokens, positions_like(tokens), full_cache(model, 2))
    assert up.dtype == dtype and set(widened) == {torch.float32}  # every product of the forward took the fp32 route
    torch.testing.assert_close(up.float(), native.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("slow", [True, False])
def test_cpu_half_attention(slow, monkeypatch):
    """On a CPU without oneDNN's bf16 kernels, masked bf16 attention (a decode step's) is computed in fp32, then
    rounded (the half SDPA is several times slower there): bit for bit the fp32 attention of the same inputs. With
    them it is the native kernel's, bit for bit. Either is within bf16 of the other."""
    from kvcompress.cache import base
    from kvcompress.cache.base import attention, visibility_mask

    monkeypatch.setitem(base.SLOW_CPU_HALF, torch.bfloat16, slow)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 16, generator=g).bfloat16() for h, t in ((4, 1), (2, 9), (2, 9)))
    q_pos, k_pos = torch.tensor([[8]]), torch.arange(9)[None]
    got = attention(q, k, v, q_pos, k_pos)
    assert got.dtype == torch.bfloat16
    upcast = attention(q.float(), k.float(), v.float(), q_pos, k_pos).bfloat16()
    native = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visibility_mask(q_pos, k_pos, 2),
                                                              enable_gqa=True)
    assert torch.equal(got, upcast if slow else native)
    torch.testing.assert_close(upcast.float(), native.float(), atol=2e-2, rtol=2e-2)
