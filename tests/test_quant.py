"""Quantizer and quantized storages (``storage=int8|int4|int2|kivi|bnb_*``): error bounds, packing, KIVI residual
semantics, bytes, keep(), bnb."""
from pathlib import Path

import pytest
import torch
from conftest import NoRotary
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.cache.buffers import GrowingBuffer
from kvcompress.cache.storage.bnb import BnbCodec, BnbStore
from kvcompress.cache.storage.quant.quantizer import QuantConfig, dequantize, quantize
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.kernels.reference import pack, unpack

CONF = Path(__file__).resolve().parents[1] / "conf"
ROPE = NoRotary()  # the stores are driven by hand: keys "rotated" by the identity


def storage(name: str, **settings):
    """A storage from its YAML (conf/storage/<name>.yaml) with settings overridden, as kvc builds it."""
    return instantiate(OmegaConf.merge(OmegaConf.load(CONF / "storage" / f"{name}.yaml"), settings), _convert_="all")


def kv(B=2, H=3, T=64, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g) * torch.linspace(0.2, 4, D)  # channels of different ranges
    return (x + torch.randn(D, generator=g)).to(dtype)  # and offsets (outlier-ish key channels)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 32), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 32 * bits // 8 and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_theoretical_bound(bits, axis, symmetric):
    cfg = QuantConfig(bits, 16, axis, symmetric)
    x = kv()
    q = quantize(x, cfg)
    err = (dequantize(q, cfg) - x).abs()
    bound = q.scale.float().repeat_interleave(16, dim=2 if axis == "channel" else -1) / 2  # |x - dequant(x)|
    assert (err <= bound * (1 + 1e-5) + 1e-6).all()
    # and the stored scale is the theoretical one: range / levels, up to fp16 rounding (up) of scale and zero
    dim = 3 if axis == "channel" else 4
    groups = x.unflatten(2, (-1, 16)) if axis == "channel" else x.unflatten(-1, (-1, 16))
    if symmetric:
        theory = groups.abs().amax(dim) / (2 ** (bits - 1) - 1)
    else:
        lo = groups.amin(dim)
        theory = (groups.amax(dim) - lo + lo.abs() * 2**-10) / (2**bits - 1)
    assert (q.scale.float() <= theory * (1 + 2**-10) + 2**-24).all()
    assert q.scale.dtype == torch.float16 and (q.zero is None) == symmetric
    assert q.zero is None or q.zero.dtype == torch.float16
    # more bits, smaller error
    if bits < 8:
        finer = QuantConfig(bits * 2, 16, axis, symmetric)
        assert (dequantize(quantize(x, finer), finer) - x).abs().mean() < err.mean() / 2


def test_int8_with_tiny_group_is_close_to_exact():
    x = kv()
    cfg = QuantConfig(8, 2, "token")
    rel = (dequantize(quantize(x, cfg), cfg) - x).abs().max() / x.abs().max()
    assert rel < 2e-3
    cfg = QuantConfig(8, 1, "token")  # one value per group: the fp16 zero point alone carries it
    assert (dequantize(quantize(x, cfg), cfg) - x).abs().max() < 1e-2


def test_constant_groups_do_not_divide_by_zero():
    x = torch.full((1, 1, 4, 8), 3.0)
    for axis in ("token", "channel"):
        cfg = QuantConfig(4, 4, axis)
        assert torch.allclose(dequantize(quantize(x, cfg), cfg), x)


@pytest.mark.parametrize("bad, msg", [(dict(bits=3), "bits must be one of (2, 4, 8), got 3"),
                                      (dict(group_size=0), "storage.group_size must be an int >= 1, got 0"),
                                      (dict(key_group_size=-2), "storage.key_group_size must be an int >= 1"),
                                      (dict(key_axis="head"), "storage.key_axis / value_axis must be one of"),
                                      (dict(residual=-1), "storage.residual must be an int >= 0"),
                                      (dict(residual_dtype="int8"), "unknown storage.residual_dtype 'int8'; valid "
                                                                    "choices: float16, bfloat16, float32, model"),
                                      (dict(keys="rotated"), "unknown storage.keys 'rotated'")])
def test_bad_settings_fail_in_the_constructor(bad, msg):
    with pytest.raises(ValueError) as e:
        QuantizedStore(**bad)
    assert msg in str(e.value)


# -- KIVI residual semantics --------------------------------------------------------------------------
def expected_fp(n, residual, group):
    """Positions held in full precision after n tokens: keys, values."""
    k_prefix = max(n - residual, 0) // group * group
    return list(range(k_prefix, n)), list(range(max(n - residual, 0), n))


@pytest.mark.parametrize("chunks", [[70], [1] * 70, [16, 16, 16, 16, 6], [3, 50, 1, 1, 15], [5, 5]])
@pytest.mark.parametrize("residual", [0, 8, 12])
def test_kivi_residual_holds_exactly_the_recent_tokens(chunks, residual):
    G, x_k, x_v = 8, kv(T=sum(chunks)), kv(T=sum(chunks), seed=1)
    store = storage("kivi", bits=2, group_size=G, residual=residual, residual_dtype="model")
    pos = torch.arange(sum(chunks)).expand(2, -1)
    n = 0
    for c in chunks:
        store.append(x_k[:, :, n : n + c], x_v[:, :, n : n + c], pos[:, n : n + c], ROPE)
        n += c
        p_all = store.positions()  # the tokens held in full precision: after each side's coded prefix
        k_fp, v_fp = p_all[..., store.k.n_q :], p_all[..., store.v.n_q :]
        exp_k, exp_v = expected_fp(n, residual, G)
        assert k_fp[0].tolist() == exp_k and v_fp[1].tolist() == exp_v
        k, v, p = store.read()
        assert p[0].tolist() == list(range(n))
        assert torch.equal(k[:, :, exp_k[0] if exp_k else n :], x_k[:, :, exp_k[0] if exp_k else n : n])
        assert torch.equal(v[:, :, n - len(exp_v) :], x_v[:, :, n - len(exp_v) : n])
        assert not torch.equal(k[:, :, : n - len(exp_k)], x_k[:, :, : n - len(exp_k)]) or len(exp_k) == n
        assert store.k.n_q % G == 0 and store.length == n


def test_codes_do_not_depend_on_chunking():
    x_k, x_v = kv(T=70), kv(T=70, seed=1)
    pos = torch.arange(70).expand(2, -1)
    reads = []
    for chunks in ([70], [1] * 70, [13, 40, 17]):
        store = storage("kivi", bits=4, group_size=8, residual=5)
        n = 0
        for c in chunks:
            store.append(x_k[:, :, n : n + c], x_v[:, :, n : n + c], pos[:, n : n + c], ROPE)
            n += c
        reads.append(store.read())
    for r in reads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(reads[0], r, strict=True))


@pytest.mark.parametrize("params", [dict(bits=4, group_size=8), dict(bits=2, group_size=8, residual=12),
                                    dict(bits=8, group_size=8, key_axis="channel", residual=5, residual_dtype="model"),
                                    dict(bits=4, group_size=8, key_axis="channel", value_axis="channel",
                                         symmetric=True)])
def test_dequant_cache_reads_exactly_the_same(params):
    """The grown dequantized copy equals dequantizing everything, after any chunking and after keep()."""
    x_k, x_v = kv(T=60), kv(T=60, seed=1)
    pos = torch.arange(60).expand(2, -1)
    plain, cached = QuantizedStore(**params), QuantizedStore(**params, dequant_cache=True)
    n = 0
    for c in (1, 13, 1, 1, 30, 4):
        for s in (plain, cached):
            s.append(x_k[:, :, n : n + c], x_v[:, :, n : n + c], pos[:, n : n + c], ROPE)
        n += c
        assert all(torch.equal(a, b) for a, b in zip(plain.read(), cached.read(), strict=True))
    assert cached.k.mirror is not None and plain.k.mirror is None
    per_head = torch.stack([torch.arange(h, 27, 2)[:13] for h in range(3)])[None]
    for idx in (torch.arange(3, 50, 2).expand(2, -1), per_head):
        for s in (plain, cached):
            s.keep(idx.expand(2, *idx.shape[1:]))
            s.append(x_k[:, :, :3], x_v[:, :, :3], torch.arange(100, 103).expand(2, -1), ROPE)
        assert all(torch.equal(a, b) for a, b in zip(plain.read(), cached.read(), strict=True))


# -- bytes ----------------------------------------------------------------------------------------
def held_tensors(obj, seen=None):
    """Every tensor reachable from the store's attributes (buffer views count what is held)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, GrowingBuffer):
        return [obj.view()] if obj.data is not None else []
    items = obj.values() if isinstance(obj, dict) else vars(obj).values() if hasattr(obj, "__dict__") else ()
    return [t for item in items for t in held_tensors(item, seen)]


@pytest.mark.parametrize("name, params", [("int8", {}), ("int4", dict(group_size=16)), ("int2", dict(group_size=8)),
                                          ("int4", dict(key_axis="channel", group_size=16, symmetric=True)),
                                          ("kivi", dict(residual=20, group_size=16)), ("bnb_int8", {}),
                                          ("bnb_nf4", dict(blocksize=32)), ("bnb_fp4", {}),
                                          ("kivi", dict(residual=20, group_size=16, dequant_cache=True))])
def test_bytes_are_the_real_tensors(name, params):
    store = storage(name, **params)
    x = kv(T=100, D=64)
    store.append(x, x, torch.arange(100).expand(2, -1), ROPE)
    reported = sum(t.nbytes for t in store.tensors())
    assert reported == sum(t.nbytes for t in held_tensors(store))
    mirror = 2 * x.nbytes if params.get("dequant_cache") else 0  # the dequantized copies of K and V
    assert sum(t.nbytes for t in store.tensors() if t.dtype == torch.float32) == mirror
    assert all(t.dtype in (torch.uint8, torch.float16, torch.int32, torch.float32) for t in store.tensors())
    store.read()  # reading never adds held state
    assert sum(t.nbytes for t in store.tensors()) == reported


@pytest.mark.parametrize("name", ["int4", "kivi", "bnb_nf4"])
def test_fresh_stores_are_empty_and_independent(name):
    """The YAML's instance is a prototype: ``fresh(layer)`` makes empty per-layer stores with its settings."""
    proto = storage(name, group_size=8, residual=4) if name == "kivi" else storage(name, **(
        {"blocksize": 32} if name.startswith("bnb") else {"group_size": 8}))
    x = kv(T=20)
    a, b = proto.fresh(0), proto.fresh(1)
    assert (a.layer, b.layer, a.length, b.length) == (0, 1, 0, 0) and a.tensors() == []
    a.append(x, x, torch.arange(20).expand(2, -1), ROPE)
    assert a.length == 20 and b.length == 0 and b.tensors() == [] and proto.length == 0
    b.append(x[:, :, :5], x[:, :, :5], torch.arange(5).expand(2, -1), ROPE)
    assert a.length == 20 and torch.equal(a.positions(), torch.arange(20, dtype=torch.int32).expand(2, -1))


@pytest.mark.parametrize("bits, g, sym", [(8, 64, False), (4, 64, False), (4, 32, True), (2, 16, False)])
def test_bytes_match_the_theory(bits, g, sym):
    B, H, T, D = 2, 3, 96, 64
    store = QuantizedStore(bits=bits, group_size=g, symmetric=sym)
    store.append(kv(B, H, T, D), kv(B, H, T, D), torch.arange(T).expand(B, -1), ROPE)
    bits_per_value = bits + (16 if sym else 32) / g
    assert sum(t.nbytes for t in store.tensors()) == 2 * B * H * T * D * bits_per_value / 8 + 4 * B * T


# -- keep(): eviction over quantized storage -------------------------------------------------------
@pytest.mark.parametrize("params", [dict(bits=4, group_size=8), dict(bits=2, group_size=8, residual=12),
                                    dict(bits=4, group_size=8, key_axis="channel", residual=4)])
def test_keep_everything_is_the_identity(params):
    store = QuantizedStore(**params)
    x = kv(T=50)
    store.append(x, x * 2, torch.arange(50).expand(2, -1), ROPE)
    before = store.read()
    store.keep(torch.arange(50).expand(2, -1))
    assert all(torch.equal(a, b) for a, b in zip(before, store.read(), strict=True))


def test_keep_per_token_gathers_codes_exactly():
    # residual_dtype="model": tokens moving from the prefix to the residual keep their dequantized
    # values bit for bit (with the fp16 default they are rounded to fp16 once)
    store = QuantizedStore(bits=4, group_size=8, residual=6, residual_dtype="model")
    x = kv(T=40)
    store.append(x, -x, torch.arange(40).expand(2, -1), ROPE)
    k0, v0, _ = store.read()
    idx = torch.stack([torch.arange(0, 40, 2), torch.arange(20, 40)])  # rows keep different tokens
    store.keep(idx)
    k1, v1, p1 = store.read()
    gather = lambda t: torch.gather(t, 2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
    assert torch.equal(k1, gather(k0)) and torch.equal(v1, gather(v0)) and torch.equal(p1, idx.int())
    assert store.length == 20 and store.k.n_q == 14


def test_keep_per_head_and_then_append():
    store = QuantizedStore(bits=4, group_size=8, key_axis="channel", residual=4)
    x = kv(T=40)
    store.append(x, x, torch.arange(40).expand(2, -1), ROPE)
    k0, _, _ = store.read()
    idx = torch.stack([torch.arange(40)[h::3][:13] for h in range(3)])[None].expand(2, -1, -1)  # (B, H, 13)
    store.keep(idx)
    k1, _, p1 = store.read()
    assert p1.shape == (2, 3, 13) and torch.equal(p1, idx.int())
    groups = 8 * (store.k.n_q // 8)
    err = (k1 - torch.gather(k0, 2, idx[..., None].expand(-1, -1, -1, 32))).abs()
    assert err[:, :, groups:].max() < 1e-2  # fp16 residual: dequantized values carried over
    store.append(x[:, :, :5], x[:, :, :5], torch.arange(40, 45).expand(2, -1), ROPE)
    assert store.positions().shape == (2, 3, 18) and store.read()[0].shape == (2, 3, 18, 32)


def test_keep_per_channel_keeps_intact_groups_and_requantizes_broken_ones():
    store = QuantizedStore(bits=2, group_size=8, key_axis="channel", value_axis="channel")
    x = kv(B=1, T=32)
    store.append(x, x, torch.arange(32)[None], ROPE)
    k0, _, _ = store.read()
    held = lambda name: store.k.parts.view()[name]
    codes0 = held("codes").clone()
    idx = torch.cat([torch.arange(0, 8), torch.arange(9, 17), torch.arange(24, 32)])[None]  # group 1 broken
    store.keep(idx)
    k1, _, _ = store.read()
    assert torch.equal(k1[:, :, :8], k0[:, :, :8]) and torch.equal(held("codes")[:, :, :8], codes0[:, :, :8])
    assert torch.equal(k1[:, :, 16:], k0[:, :, 24:])
    # the broken group is re-quantized from dequantized values: within its own new scale of them
    assert (k1[:, :, 8:16] - k0[:, :, 9:17]).abs().max() <= held("scale")[:, :, 1].float().max() / 2 + 1e-6


# -- bitsandbytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, gap", [("int8", 0.0141), ("nf4", 0.3038), ("fp4", 0.3334)])
def test_bnb_round_trip_on_cpu(kind, gap):
    codec = BnbCodec(kind, 32)
    x = kv(T=20, D=64)
    q, absmax = codec.encode(x)
    assert q.dtype == torch.uint8 and q.shape == (2, 3, 20, 64 * codec.bits // 8) and absmax.dtype == torch.float16
    y = codec.decode(q, absmax, torch.float32)
    bound = absmax.float().repeat_interleave(32, -1) * (gap / 2 + 2**-10)  # half the widest code gap
    assert ((y - x).abs() <= bound + 1e-6).all()
    store = storage(f"bnb_{kind}", blocksize=32)
    assert isinstance(store, BnbStore) and store.codec == codec
    store.append(x, x, torch.arange(20).expand(2, -1), ROPE)
    store.keep(torch.arange(5, 20).expand(2, -1))
    assert torch.equal(store.read()[0], y[:, :, 5:])


def test_bnb_bad_settings():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        BnbStore("nf4", blocksize=48)
    with pytest.raises(ValueError, match="kind must be one of"):
        BnbStore("int4")
    from kvcompress.cache.base import ModelSpec

    with pytest.raises(ValueError, match="blocksize=64 must divide head_dim=32"):
        storage("bnb_int8").check(ModelSpec("m", 1, 1, 1, 32, 8))
    with pytest.raises(ValueError, match=r"bitsandbytes blocks are at least 32 values.*use storage=int8"):
        storage("bnb_int8").check(ModelSpec("m", 1, 1, 1, 16, 8))


# -- CUDA (skipped without a GPU) ---------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("name, params", [("int4", dict(group_size=16)), ("kivi", dict(group_size=8, residual=12)),
                                          ("int2", dict(group_size=8, key_axis="channel", symmetric=True))])
def test_cuda_store_matches_cpu(name, params):
    x_k, x_v, pos = kv(T=70), kv(T=70, seed=1), torch.arange(70).expand(2, -1)
    cpu, gpu = storage(name, **params), storage(name, **params)
    for lo, hi in ((0, 33), (33, 34), (34, 70)):
        cpu.append(x_k[:, :, lo:hi], x_v[:, :, lo:hi], pos[:, lo:hi], ROPE)
        gpu.append(x_k[:, :, lo:hi].cuda(), x_v[:, :, lo:hi].cuda(), pos[:, lo:hi].cuda(), ROPE)
    for a, b in zip(cpu.tensors(), gpu.tensors(), strict=True):  # codes, scales, zeros, residuals, positions
        assert b.is_cuda and a.dtype == b.dtype and a.shape == b.shape
    bound = max(p.scale.view().float().max().item() for p in (cpu.k, cpu.v))  # rounding may differ by a code
    assert all((a - b.cpu()).abs().max() <= bound for a, b in zip(cpu.read(), gpu.read(), strict=True))


@cuda
@pytest.mark.parametrize("kind", ["int8", "nf4", "fp4"])
def test_bnb_round_trip_on_cuda(kind):
    codec = BnbCodec(kind, 64)
    x = kv(T=20, D=64)
    q, absmax = codec.encode(x.cuda())
    assert q.is_cuda and q.dtype == torch.uint8 and absmax.dtype == torch.float16
    y = codec.decode(q, absmax, torch.float32).cpu()
    q_cpu, absmax_cpu = codec.encode(x)
    assert (y - codec.decode(q_cpu, absmax_cpu, torch.float32)).abs().max() < 0.05 * x.abs().max()
