"""Triton decode attention over FP8 (e4m3 / e5m2) and FP4 (NVFP4 / MXFP4) codes against its reference, the codec's
own ``decode`` then the kernels' reference attention, under ``TRITON_INTERPRET=1`` on CPU tensors (tiny shapes).

The decoders are exact (every byte / nibble against torch's float8 casts and the e2m1 grid), so the kernel differs
from the reference only in its summation order: fp32 queries to 1e-5, bf16 queries to 2e-2 (a bf16 output is
rounded at 2^-8 relative, and the reference's SDPA runs in bf16). No GPU was used: these kernels have no GPU figure.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if "triton" not in sys.modules and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvcompress import kernels  # noqa: E402
from kvcompress.cache import ComposedCache  # noqa: E402
from kvcompress.cache.base import PAD_POSITION  # noqa: E402
from kvcompress.cache.storage.frontier.formats import e2m1_values  # noqa: E402
from kvcompress.cache.storage.frontier.fp4 import Fp4Store  # noqa: E402
from kvcompress.cache.storage.frontier.fp8 import Fp8Store  # noqa: E402
from kvcompress.kernels import Packed, dense  # noqa: E402
from tests.conftest import (  # noqa: E402
    spec_of,
    static_prefill,
    tiny_model,
    triton_interpreted,
    triton_tests_in_a_subprocess,
)

INTERP = triton_interpreted()
interpreter = pytest.mark.skipif(not INTERP, reason="needs triton under TRITON_INTERPRET=1 (see the subprocess test)")

if INTERP:
    import triton
    import triton.language as tl

    from kvcompress.kernels.triton_fp import e8m0, minifloat

    @triton.jit
    def _decode_bytes(X, Y, N, EXP: tl.constexpr, MAN: tl.constexpr, BIAS: tl.constexpr, MX: tl.constexpr):
        i = tl.arange(0, 256)
        bits = tl.load(X + i, mask=i < N, other=0).to(tl.int32)
        if MX:
            y = e8m0(bits)
        else:
            y = minifloat(bits, EXP, MAN, BIAS)
        tl.store(Y + i, y, mask=i < N)


class Samples:
    """A calibration context whose samples are given (half the test's range: the largest entries saturate)."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def kv_samples(self):
        return [(self.k, self.v, None)]


def data(seed=0, B=2, Hkv=2, T=19, D=64):
    """K, V with entries from 1e-9 of the range up (fp8 / e2m1 subnormals, underflow) and one all-zero token."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, Hkv, T, D, generator=g) * 3, torch.randn(B, Hkv, T, D, generator=g)
    tiny = torch.logspace(-9, -1, 9)
    k[..., :9], v[..., -9:] = k[..., :9] * tiny, v[..., -9:] * tiny
    v[0, 0, 4] = 0.0  # mxfp4: every block amax 0, e8m0 byte 0
    return k, v


STORES = {  # calibrated stores are calibrated on half the data's range
    **{f"{fmt} {scale}": (lambda fmt=fmt, scale=scale: Fp8Store(fmt, scale))
       for fmt in ("e4m3", "e5m2") for scale in ("token", "head", "tensor")},
    "e5m2 tensor uncalibrated": lambda: Fp8Store("e5m2", "tensor"),
    "nvfp4": lambda: Fp4Store("nvfp4"),
    "nvfp4 uncalibrated": lambda: Fp4Store("nvfp4"),
    "mxfp4": lambda: Fp4Store("mxfp4"),
}


def store_of(name, k, v):
    store = STORES[name]()
    if "uncalibrated" not in name:
        store.calibrate(Samples(k * 0.5, v * 0.5))
    return store


def positions(B, Hkv, T, per_head):
    """Key positions with hidden slots (PAD_POSITION) in row 1 and, ``per_head``, another order per head."""
    k_pos = torch.arange(T).expand(B, T).clone()
    k_pos[1, -2:] = PAD_POSITION
    if per_head:
        k_pos = k_pos[:, None].repeat(1, Hkv, 1)
        k_pos[:, 1] = k_pos[:, 1].flip(-1)
        k_pos[0, 0, 7] = PAD_POSITION
    return k_pos


def reference(store, q, q_pos, k_pos, parts):
    """The kernel's reference: the codec's decode, then the kernels' reference attention over the dense tokens."""
    kd, vd = store.decode(parts, q.dtype)
    return kernels.quant_attention(q, q_pos, k_pos, dense(kd), dense(vd), backend="torch")


@interpreter
@pytest.mark.parametrize("fmt,exp,man,bias", [("e4m3", 4, 3, 7), ("e5m2", 5, 2, 15)])
def test_triton_fp8_decoder_is_exact_for_every_byte(fmt, exp, man, bias):
    x = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    want = x.view(torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2).float()
    got = torch.empty(256)
    _decode_bytes[(1,)](x, got, 256, exp, man, bias, False)
    finite = want.isfinite()  # NaN / inf bytes: never stored (the codec saturates)
    assert finite.sum() >= 248 and torch.equal(got[finite], want[finite])
    assert torch.equal(got[finite].signbit(), want[finite].signbit())


@interpreter
def test_triton_e2m1_and_e8m0_decoders_are_exact():
    nibbles, got = torch.arange(16, dtype=torch.uint8), torch.empty(16)
    _decode_bytes[(1,)](nibbles, got, 16, 2, 1, 1, False)
    assert torch.equal(got, e2m1_values(nibbles))
    scales, got = torch.arange(255, dtype=torch.uint8), torch.empty(255)
    _decode_bytes[(1,)](scales, got, 255, 0, 0, 0, True)
    assert torch.equal(got, torch.exp2(scales.float() - 127)) and got[0] > 0  # byte 0: 2^-127, subnormal


@interpreter
@pytest.mark.parametrize("name", list(STORES))
@pytest.mark.parametrize("dtype,per_head", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16-per-head"])
def test_triton_attention_over_float_codes_equals_the_codec_reference(name, dtype, per_head, monkeypatch):
    """GQA (2 query heads per KV head), 19 tokens, hidden slots, causal: the last 3 tokens are after the query."""
    k, v = data()
    store = store_of(name, k, v)
    parts = store.encode(k, v)
    q = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    q_pos, k_pos = torch.full((2, 1), 15), positions(2, 2, 19, per_head)
    want = reference(store, q, q_pos, k_pos, parts)
    monkeypatch.setenv("KVC_KERNELS", "triton")
    got = store.attend_packed(q, q_pos, k_pos, parts)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def with_junk(parts, extra):
    """Each part in a buffer of ``extra`` more slots holding junk (random bytes: float8 NaNs included)."""
    out = {}
    for name, t in parts.items():
        shape = (*t.shape[:2], extra, *t.shape[3:])
        junk = torch.randint(0, 256, shape, dtype=torch.uint8)
        junk = junk.view(t.dtype) if t.element_size() == 1 else torch.randn(shape).to(t.dtype) * 9
        out[name] = torch.cat([t, junk], 2)
    return out


@interpreter
@pytest.mark.parametrize("name", ["e4m3 token", "e5m2 head", "nvfp4", "mxfp4"])
def test_triton_device_lengths_read_only_the_written_slots(name, monkeypatch):
    """The captured form's buffers: junk at visible positions beyond ``lengths`` (0-d) is never read."""
    k, v = data(T=13)
    store = store_of(name, k, v)
    parts = store.encode(k, v)
    q, q_pos = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(2)), torch.full((2, 1), 20)
    k_pos = positions(2, 2, 13, False)
    want = reference(store, q, q_pos, k_pos, parts)
    monkeypatch.setenv("KVC_KERNELS", "triton")
    cap_pos = torch.cat([k_pos, torch.zeros(2, 11, dtype=k_pos.dtype)], 1)
    got = store.attend_packed(q, q_pos, cap_pos, with_junk(parts, 11), torch.tensor(13))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_cpu_path_decodes_then_attends(monkeypatch):
    """Without Triton the stores return None (decode, then attention: the reference), and the reference refuses
    float codes it would have to decode a second way."""
    k, v = data(T=5)
    store = Fp4Store("mxfp4")
    parts = store.encode(k, v)
    monkeypatch.setenv("KVC_KERNELS", "torch")
    q, q_pos, k_pos = torch.randn(2, 4, 1, 64), torch.full((2, 1), 9), positions(2, 2, 5, False)
    assert store.attend_packed(q, q_pos, k_pos, parts) is None
    with pytest.raises(ValueError, match="fmt='mxfp4'"):
        kernels.quant_attention(q, q_pos, k_pos, store.packed(parts, "k"), store.packed(parts, "v"), backend="torch")


def test_packed_float_layouts_are_checked():
    codes, scale = torch.zeros(1, 1, 2, 8, dtype=torch.uint8), torch.ones(1, 1, 2, 1)
    with pytest.raises(ValueError, match="fmt must be one of"):
        Packed(codes, scale, bits=4, group_size=16, fmt="e4m3")
    with pytest.raises(ValueError, match="fmt must be one of"):
        Packed(codes, scale, bits=8, group_size=8, fmt="fp6")
    with pytest.raises(ValueError, match="outer"):
        Packed(codes, scale, bits=4, group_size=16, fmt="nvfp4")


@pytest.fixture(scope="module")
def model():
    return tiny_model(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)


@interpreter
@pytest.mark.parametrize("make", [lambda: Fp8Store("e4m3", "token"), lambda: Fp4Store("mxfp4")],
                         ids=["fp8", "mxfp4"])
@torch.inference_mode()
def test_triton_in_both_decode_paths_through_the_kernel(make, model, monkeypatch):
    """A tiny model (head_dim 32, GQA): the eager store and its captured form with the kernel give the logits of
    decode-then-attend (``KVC_KERNELS=torch``), 2 decode steps; the kernel runs once per layer and step. 16-token
    splits: eager (21, 22 tokens) and captured (40 slots) run 2 and 3 splits, and give the same logits bit for bit."""
    from kvcompress.kernels import triton_attention

    launches = []
    kernel = triton_attention.attend_rows
    def counted(*a, **kw):
        launches.append(1)
        return kernel(*a, block_t=16, split_tokens=16, **kw)

    monkeypatch.setattr(triton_attention, "attend_rows", counted)
    toks = torch.randint(0, 97, (2, 22), generator=torch.Generator().manual_seed(3))
    logits = {}
    for backend, captured in (("torch", False), ("triton", False), ("triton", True)):
        monkeypatch.setenv("KVC_KERNELS", backend)
        launches.clear()
        cache = ComposedCache(make())
        cache.setup(spec_of(model))
        cache = cache.static_form(40) if captured else cache
        cache.setup(spec_of(model))
        static_prefill(model, cache, toks[:, :20])
        logits[backend, captured] = [model(toks[:, t:t + 1], torch.full((2, 1), t), cache) for t in range(20, 22)]
        assert len(launches) == (2 if backend == "triton" else 0)
    for key in (("triton", False), ("triton", True)):
        for got, want in zip(logits[key], logits["torch", False], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(logits["triton", True], logits["triton", False], strict=True):
        assert torch.equal(got, want)


@pytest.mark.skipif(not (CUDA and INTERP is False), reason="needs CUDA and triton")
@pytest.mark.parametrize("name", list(STORES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_attention_over_float_codes_equals_the_codec_reference(name, dtype, monkeypatch):
    """Compiled: 1,000 tokens (several token splits), per-head positions with hidden slots."""
    k, v = (x.cuda() for x in data(T=1000))
    store = store_of(name, k, v)
    parts = store.encode(k, v)
    q = torch.randn(2, 4, 1, 64, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
    q_pos, k_pos = torch.full((2, 1), 990, device="cuda"), positions(2, 2, 1000, True).cuda()
    want = reference(store, q, q_pos, k_pos, parts)
    monkeypatch.setenv("KVC_KERNELS", "triton")
    got = store.attend_packed(q, q_pos, k_pos, parts)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(INTERP is not False or CUDA, reason="triton missing, already interpreted here, or CUDA")
def test_kernels_fp_in_an_interpreter_subprocess():
    triton_tests_in_a_subprocess(__file__)
