"""Fused kernels: PyTorch reference vs the storage's dequantize-then-attention path (exact to fp tolerance),
and the Triton kernels vs the reference under the Triton interpreter (tiny shapes: the interpreter is slow).

``TRITON_INTERPRET=1`` only takes effect if set before triton is first imported; when some other import
(bitsandbytes) got there first, the interpreter tests run in one subprocess of this file instead. Where CUDA
is, the compiled kernels are tested on the GPU instead (longer histories, several token splits, bf16).
"""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

CUDA = torch.cuda.is_available()
if "triton" not in sys.modules and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvcompress import kernels  # noqa: E402
from kvcompress.cache.base import PAD_POSITION, attention  # noqa: E402
from kvcompress.cache.storage.latent.absorbed import Projection, absorbed_key_scores, latent_attention  # noqa: E402
from kvcompress.cache.storage.quant.quantizer import QuantConfig, dequantize, quantize  # noqa: E402
from kvcompress.kernels import Packed, reference  # noqa: E402
from tests.conftest import triton_interpreted, triton_tests_in_a_subprocess  # noqa: E402

INTERP = triton_interpreted()
interpreter = pytest.mark.skipif(not INTERP, reason="needs triton under TRITON_INTERPRET=1 (see the subprocess test)")


def sides(k, v, n_qk, n_qv, kcfg, vcfg):
    """Packed K/V sides (quantized prefixes of n_qk / n_qv tokens) and their dequantize-then-concat K/V."""
    out = []
    for x, n, cfg in ((k, n_qk, kcfg), (v, n_qv, vcfg)):
        res = x[:, :, n:] if n < x.shape[2] else None
        if not n:
            out.append((Packed(res=res), x))
            continue
        q = quantize(x[:, :, :n], cfg)
        full = dequantize(q, cfg) if res is None else torch.cat([dequantize(q, cfg), res], 2)
        out.append((Packed(q.codes, q.scale, q.zero, res, cfg.bits, cfg.group_size, cfg.axis), full))
    return out


def case(seed=0, B=2, Hkv=2, groups=2, Tq=1, D=16, T=37, per_head=False):
    """Random q, K, V; positions with padding in row 1 and, ``per_head``, a different token order per head."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * groups, Tq, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g) * 2, torch.randn(B, Hkv, T, D, generator=g)
    k_pos = torch.arange(T).expand(B, T).clone()
    k_pos[1, -2:] = PAD_POSITION
    if per_head:
        k_pos = k_pos[:, None].repeat(1, Hkv, 1)
        k_pos[:, 1] = k_pos[:, 1].flip(-1)
    q_pos = torch.arange(T - Tq - 3, T - 3).expand(B, Tq).clone()
    return q, q_pos, k, v, k_pos


LAYOUTS = [  # (key config, value config, prefix tokens of K, of V) out of T = 37
    (QuantConfig(2, 8, "channel"), QuantConfig(2, 8, "token"), 24, 29),  # KIVI-2: keys per channel, residual
    (QuantConfig(4, 8, "token"), QuantConfig(4, 16, "token"), 37, 37),  # int4 per token, no residual
    (QuantConfig(8, 16, "token", True), QuantConfig(4, 8, "channel", True), 30, 16),  # symmetric int8 / int4
]


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("Tq,per_head", [(1, False), (3, True)])
def test_reference_equals_dequantize_then_attention(layout, Tq, per_head):
    kcfg, vcfg, n_qk, n_qv = LAYOUTS[layout]
    q, q_pos, k, v, k_pos = case(Tq=Tq, per_head=per_head)
    (ks, kd), (vs, vd) = sides(k, v, n_qk, n_qv, kcfg, vcfg)
    want = attention(q, kd, vd, q_pos, k_pos)
    got = kernels.quant_attention(q, q_pos, k_pos, ks, vs, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rows = q.reshape(2, 2, -1, 16)
    chunked = reference.attend_rows(rows, q_pos, k_pos, ks, vs, 16**-0.5, chunk=5)  # online softmax across chunks
    torch.testing.assert_close(chunked.reshape(got.shape), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", [("channel", "token", 8), ("token", "token", 0)])
def test_residual_stage_read_as_a_side_equals_its_dequantized_read(kv):
    """The storage's own residual stage (chunked appends, int32 positions) through ``packed``: no copy, same
    attention."""
    from kvcompress.cache.storage.quant.codec import QuantSide
    from kvcompress.cache.storage.residual import Stage

    k_axis, v_axis, residual = kv
    q, q_pos, k, v, k_pos = case(Tq=1)
    parts = [Stage(QuantSide(QuantConfig(2, 8, axis)), residual, torch.float32) for axis in (k_axis, v_axis)]
    for lo, hi in ((0, 20), (20, 21), (21, 37)):
        parts[0].append(k[:, :, lo:hi])
        parts[1].append(v[:, :, lo:hi])
    want = attention(q, parts[0].read(q.dtype), parts[1].read(q.dtype), q_pos, k_pos.int())
    ks, vs = parts[0].packed(), parts[1].packed()
    assert ks.n_q == parts[0].n_q and ks.length == vs.length == 37
    assert ks.codes.data_ptr() == parts[0].parts.view()["codes"].data_ptr()  # a view of the stored codes
    got = kernels.quant_attention(q, q_pos, k_pos.int(), ks, vs, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if INTERP:
        torch.testing.assert_close(kernels.quant_attention(q, q_pos, k_pos.int(), ks, vs, backend="triton"), want,
                                   atol=1e-5, rtol=1e-5)


def test_reference_in_half_precision_rounds_like_the_storage():
    kcfg, vcfg, n_qk, n_qv = LAYOUTS[0]
    q, q_pos, k, v, k_pos = case()
    (ks, kd), (vs, vd) = sides(k, v, n_qk, n_qv, kcfg, vcfg)
    want = attention(q.bfloat16(), kd.bfloat16(), vd.bfloat16(), q_pos, k_pos).float()
    got = kernels.quant_attention(q.bfloat16(), q_pos, k_pos, ks, vs, backend="torch")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def latent_case(G, H=2, d=16, rk=6, rv=5, T=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = H // G * d
    kp = Projection(torch.linalg.qr(torch.randn(G, n, rk, generator=g))[0], torch.randn(G, n, generator=g), H)
    vp = Projection(torch.linalg.qr(torch.randn(G, n, rv, generator=g))[0], torch.randn(G, n, generator=g), H)
    ck, cv = torch.randn(2, G, T, rk, generator=g), torch.randn(2, G, T, rv, generator=g)
    return kp, vp, ck, cv


@pytest.mark.parametrize("G", [1, 2])
def test_latent_reference_equals_absorbed(G):
    q, q_pos, _, _, k_pos = case(Tq=2)
    kp, vp, ck, cv = latent_case(G)
    want = latent_attention(q, q_pos, k_pos, cv, vp, absorbed_key_scores(q, ck, kp))
    want = want[0] if isinstance(want, tuple) else want  # (out, weights) where the store also returns weights
    got = kernels.latent_attention(q, q_pos, k_pos, ck, cv, kp.head_basis(), vp.head_basis(), vp.head_mean(),
                                   backend="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def quant_inputs(seed=0):
    """Values that stress the rounding: ties, constant groups, near the fp16 limit, subnormals, negative zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 5, 16, generator=g) * 3
    x[0, 0, 0] = torch.arange(16.0)  # integer steps: exact .5 ties in the codes
    x[0, 0, 1] = 1.5  # constant group: scale floor
    x[0, 1, 0, :8] = torch.tensor([6e4, -6e4, 1e-9, -1e-9, 0.0, -0.0, 6e-8, 3e-5])
    x[1, 1, 2] = -1e-9
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_reference_is_bit_exact(bits, symmetric):
    inputs = ((4, quant_inputs()), (16, quant_inputs()), (8, quant_inputs().half()), (8, quant_inputs(1).bfloat16()))
    for g, x in inputs:  # fp16 / bf16: the residual dtypes a storage quantizes from
        want = quantize(x, QuantConfig(bits, g, "token", symmetric))
        codes, scale, zero = kernels.quantize_tokens(x, bits, g, symmetric, backend="torch")
        assert torch.equal(codes, want.codes) and torch.equal(scale, want.scale)
        assert (zero is None and want.zero is None) or torch.equal(zero, want.zero)


def test_microbenchmark_runs_every_storage(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts/bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--dtype", "float32", "--contexts", "160", "--batches", "1",
                       "--backends", "torch", "--repeats", "1", "--out", str(tmp_path)])
    assert {r["storage"] for r in rows} == set(bench.STORAGES) and all(r["ms"] > 0 for r in rows)
    assert "| kivi2 | torch | 160 | 1 |" in (tmp_path / "kernels.md").read_text()


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("KVC_KERNELS", "auto")
    assert kernels.resolve(cpu) == "torch"  # auto: the reference off CUDA
    assert kernels.resolve(cpu, "torch") == "torch"
    with pytest.raises(ValueError, match="KVC_KERNELS"):
        kernels.resolve(cpu, "cuda")
    monkeypatch.setenv("KVC_KERNELS", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        kernels.resolve(cpu)
    monkeypatch.setenv("KVC_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        kernels.resolve(cpu)


# -- Triton kernels under the interpreter ---------------------------------------------------------
@interpreter
@pytest.mark.parametrize("layout,Tq,per_head", [(0, 1, False), (2, 3, True)])
def test_triton_quant_attention_equals_reference(layout, Tq, per_head):
    kcfg, vcfg, n_qk, n_qv = LAYOUTS[layout]
    q, q_pos, k, v, k_pos = case(Tq=Tq, per_head=per_head)
    (ks, _), (vs, _) = sides(k, v, n_qk, n_qv, kcfg, vcfg)
    want = kernels.quant_attention(q, q_pos, k_pos, ks, vs, backend="torch")
    got = kernels.quant_attention(q, q_pos, k_pos, ks, vs, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@interpreter
def test_triton_token_splits_merge_to_the_reference():
    """Flash-decoding: 3 splits of 64 tokens merged by the combine kernel; row 0 sees nothing in two of them."""
    from kvcompress.kernels import triton_attention

    kcfg, vcfg, n_qk, n_qv = LAYOUTS[0]
    q, q_pos, k, v, k_pos = case(Tq=2, T=150)
    q_pos[0] = torch.tensor([40, 41])
    (ks, _), (vs, _) = sides(k, v, 128, 136, kcfg, vcfg)
    rows = q.reshape(2, 2, -1, 16)
    want = reference.attend_rows(rows, q_pos, k_pos, ks, vs, 0.25)
    got = triton_attention.attend_rows(rows, q_pos, k_pos, ks, vs, 0.25, block_t=16, split_tokens=64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def capacity(side: Packed, extra_q: int, extra_r: int) -> Packed:
    """The side's tensors in larger buffers whose spare slots hold junk (a static-capacity storage)."""
    def grow(t: Tensor | None, n: int) -> Tensor | None:
        if t is None:
            return None
        shape = (*t.shape[:2], n, t.shape[3])
        junk = torch.randint(0, 255, shape, dtype=torch.uint8) if t.dtype == torch.uint8 else torch.randn(shape) * 9
        return torch.cat([t, junk.to(t.dtype)], 2)
    per = 1 if side.axis == "token" else side.group_size
    return replace(side, codes=grow(side.codes, extra_q), scale=grow(side.scale, extra_q // per),
                   zero=grow(side.zero, extra_q // per), res=grow(side.res, extra_r))


def fp8_side(x: Tensor) -> Packed:
    """e4m3 bytes with one fp32 scale per token (the fp8 storage's per-token layout)."""
    s = x.abs().amax(-1, keepdim=True) / 448
    return Packed((x / s).to(torch.float8_e4m3fn).view(torch.uint8), s, bits=8, group_size=x.shape[-1], fmt="e4m3")


@interpreter
@pytest.mark.parametrize("fmt", ["int", "e4m3"])
def test_triton_capacity_buffers_equal_the_held_tokens_bit_for_bit(fmt):
    """Captured equals eager through the kernel: capacity buffers (junk beyond, visible positions, lengths on the
    device) vs exactly the n held tokens, torch.equal, for n around the 32-token split boundaries (16-token blocks,
    112 slots: splits past n are empty). Row 0 sees only 42 tokens (splits it sees nothing of)."""
    from kvcompress.kernels import triton_attention

    kcfg, vcfg, _, _ = LAYOUTS[0]  # KIVI-2: per-channel keys (whole groups of 8), per-token values, residuals
    q, q_pos, k, v, k_pos = case(Tq=2, T=96)
    q_pos[0] = torch.tensor([40, 41])
    rows = q.reshape(2, 2, -1, 16)
    for n in (31, 32, 33, 64, 70, 96):
        n_qk, n_qv = ((n - 4) // 8 * 8, n - 5) if fmt == "int" else (n, n)
        if fmt == "int":
            (ks, _), (vs, _) = sides(k[:, :, :n], v[:, :, :n], n_qk, n_qv, kcfg, vcfg)
            want = reference.attend_rows(rows, q_pos, k_pos[:, :n], ks, vs, 0.25)
        else:
            ks, vs = fp8_side(k[:, :, :n]), fp8_side(v[:, :, :n])
            kd, vd = (Packed(res=s.codes.view(torch.float8_e4m3fn).float() * s.scale) for s in (ks, vs))
            want = reference.attend_rows(rows, q_pos, k_pos[:, :n], kd, vd, 0.25)
        kc, vc = (capacity(s, 96 - s.n_q, 16 - n + s.n_q) for s in (ks, vs))  # 96 + 16 slots
        pos = torch.cat([k_pos[:, :n], torch.zeros(2, 112 - n, dtype=k_pos.dtype)], 1)  # junk slots visible
        lengths = torch.tensor([n_qk, n_qv, n], dtype=torch.int32)
        eager = triton_attention.attend_rows(rows, q_pos, k_pos[:, :n], ks, vs, 0.25, block_t=16, split_tokens=32)
        captured = triton_attention.attend_rows(rows, q_pos, pos, kc, vc, 0.25, block_t=16, split_tokens=32,
                                                lengths=lengths)
        assert torch.equal(captured, eager), n
        torch.testing.assert_close(eager, want, atol=1e-5, rtol=1e-5)


@interpreter
def test_triton_split_settings_are_checked():
    from kvcompress.kernels import triton_attention

    q, q_pos, k, v, k_pos = case()
    ks, vs = Packed(res=k), Packed(res=v)
    with pytest.raises(ValueError, match="split_tokens must be a positive multiple of block_t=16"):
        triton_attention.attend_rows(q.reshape(2, 2, -1, 16), q_pos, k_pos, ks, vs, 0.25, block_t=16, split_tokens=40)
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        triton_attention.attend_rows(q.reshape(2, 2, -1, 16), q_pos, k_pos, ks, vs, 0.25, block_t=24)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreter)])
def test_device_lengths_over_capacity_buffers(backend):
    """Capacity buffers with junk (visible positions!) beyond the lengths: only the held tokens count."""
    kcfg, vcfg, n_qk, n_qv = LAYOUTS[0]
    q, q_pos, k, v, k_pos = case(Tq=1)
    (ks, _), (vs, _) = sides(k, v, n_qk, n_qv, kcfg, vcfg)
    want = kernels.quant_attention(q, q_pos, k_pos, ks, vs, backend="torch")
    kc, vc = capacity(ks, 16, 8), capacity(vs, 8, 16)  # both 61 token slots, 37 held
    pos = torch.cat([k_pos, torch.zeros(2, 24, dtype=k_pos.dtype)], 1)  # junk slots at position 0: visible
    lengths = torch.tensor([n_qk, n_qv, 37], dtype=torch.int32)
    got = kernels.quant_attention(q, q_pos, pos, kc, vc, backend=backend, lengths=lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@interpreter
@pytest.mark.parametrize("settings", [dict(bits=4, group_size=8),
                                      dict(bits=2, group_size=2, key_axis="channel", residual=2)])  # int4, KIVI-2
@torch.inference_mode()
def test_triton_static_quant_cache_equals_its_reference(settings):
    """The captured int4 / KIVI forms on the kernels (quantize on append, attention with device lengths: prefix and
    residual counts) vs the reference."""
    from kvcompress.cache.storage.quant.store import QuantizedStore
    from kvcompress.engine.generate import positions_like
    from tests.conftest import spec_of, tiny_model

    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    out = []
    for backend in ("torch", "triton"):
        cache = QuantizedStore(backend=backend, **settings).static_form(10)
        cache.setup(spec_of(model))
        cache.reset(2)
        logits = [model(tokens[:, :5], positions_like(tokens[:, :5]), cache)]
        for i in (5, 6):
            logits.append(model(tokens[:, i : i + 1], torch.full((2, 1), i), cache))
        out.append(torch.cat(logits, 1))
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)


@interpreter
@pytest.mark.parametrize("G", [1, 2])
def test_triton_latent_attention_equals_reference(G):
    q, q_pos, _, _, k_pos = case(Tq=1)
    kp, vp, ck, cv = latent_case(G)
    args = (q, q_pos, k_pos, ck, cv, kp.head_basis(), vp.head_basis(), vp.head_mean())
    torch.testing.assert_close(kernels.latent_attention(*args, backend="triton"),
                               kernels.latent_attention(*args, backend="torch"), atol=1e-5, rtol=1e-5)


@interpreter
@pytest.mark.parametrize("bits,symmetric", [(2, False), (4, True), (8, False)])
def test_triton_quantize_is_bit_exact(bits, symmetric):
    x = quant_inputs()
    want = quantize(x, QuantConfig(bits, 4, "token", symmetric))
    codes, scale, zero = kernels.quantize_tokens(x, bits, 4, symmetric, backend="triton")
    assert torch.equal(codes, want.codes) and torch.equal(scale, want.scale)
    assert (zero is None and want.zero is None) or torch.equal(zero, want.zero)


@pytest.mark.skipif(INTERP is not False or CUDA, reason="triton missing, already interpreted here, or CUDA (below)")
def test_kernels_in_an_interpreter_subprocess():
    triton_tests_in_a_subprocess(__file__)


# -- compiled kernels on CUDA -----------------------------------------------------------------------
cuda = pytest.mark.skipif(not (CUDA and INTERP is False), reason="needs CUDA and triton")


def on_cuda(side: Packed) -> Packed:
    return Packed(*(None if t is None else t.cuda() for t in (side.codes, side.scale, side.zero, side.res)),
                  side.bits, side.group_size, side.axis)


@cuda
def test_cuda_graph_replays_attention_with_device_lengths():
    """Captured once over capacity buffers; each replay reads the lengths written into device memory."""
    kcfg, vcfg, n_qk, n_qv = LAYOUTS[0]
    q, q_pos, k, v, k_pos = case(Tq=1)
    (ks, _), (vs, _) = sides(k, v, n_qk, n_qv, kcfg, vcfg)
    kc, vc = on_cuda(capacity(ks, 16, 8)), on_cuda(capacity(vs, 8, 16))
    pos = torch.cat([k_pos, torch.zeros(2, 24, dtype=k_pos.dtype)], 1).cuda()
    q, q_pos = q.cuda(), q_pos.cuda()
    lengths = torch.tensor([n_qk, n_qv, 37], dtype=torch.int32, device="cuda")
    run = lambda: kernels.quant_attention(q, q_pos, pos, kc, vc, backend="triton", lengths=lengths)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for lens in ([n_qk, n_qv, 37], [16, 21, 29], [8, 8, 20]):
        lengths.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        want = kernels.quant_attention(q, q_pos, pos, kc, vc, backend="torch", lengths=lengths)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_quant_attention_equals_reference(layout, dtype):
    kcfg, vcfg, _, _ = LAYOUTS[layout]
    T, n_q = 3000, 2944  # many blocks and splits; the prefix a multiple of every group size (16, 32, 64)
    q, q_pos, k, v, k_pos = case(B=3, Hkv=3, groups=3, Tq=2, D=64, T=T, per_head=layout == 2)
    kcfg64 = QuantConfig(kcfg.bits, 16 if kcfg.axis == "channel" else 32, kcfg.axis, kcfg.symmetric)
    vcfg64 = QuantConfig(vcfg.bits, 16 if vcfg.axis == "channel" else 64, vcfg.axis, vcfg.symmetric)
    (ks, _), (vs, _) = sides(k, v, n_q, n_q, kcfg64, vcfg64)
    args = (q.cuda().to(dtype), q_pos.cuda(), k_pos.cuda(), on_cuda(ks), on_cuda(vs))
    want = kernels.quant_attention(*args, backend="torch").float()
    got = kernels.quant_attention(*args, backend="triton").float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@cuda
@pytest.mark.parametrize("G", [1, 3])
def test_cuda_latent_attention_equals_reference(G):
    q, q_pos, _, _, k_pos = case(B=2, Hkv=3, groups=3, Tq=1, D=64, T=2000)
    kp, vp, ck, cv = latent_case(G, H=3, d=64, rk=48, rv=40, T=2000)
    args = [t.cuda() for t in (q, q_pos, k_pos, ck, cv, kp.head_basis(), vp.head_basis(), vp.head_mean())]
    torch.testing.assert_close(kernels.latent_attention(*args, backend="triton"),
                               kernels.latent_attention(*args, backend="torch"), atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.parametrize("bits,symmetric", [(2, False), (4, False), (4, True), (8, False)])
def test_cuda_quantize_is_bit_exact(bits, symmetric):
    x = torch.cat([quant_inputs().reshape(-1, 16), torch.randn(5000, 16) * 10]).reshape(2, -1, 16).cuda()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = quantize(x.to(dtype)[:, None], QuantConfig(bits, 8, "token", symmetric))
        codes, scale, zero = kernels.quantize_tokens(x.to(dtype)[:, None], bits, 8, symmetric, backend="triton")
        assert torch.equal(codes, want.codes) and torch.equal(scale, want.scale)
        assert (zero is None and want.zero is None) or torch.equal(zero, want.zero)
