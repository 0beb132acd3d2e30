"""The static-capacity cache and the captured decode step: equal to the growing full cache, and the step
traces as one graph (no breaks, no host syncs) whose result equals the eager step exactly. The CUDA graph
capture itself runs only where CUDA is."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.layout.cla import CLA
from kvcompress.cache.policy.snapkv import SnapKV
from kvcompress.cache.storage.dense import StaticKVCache
from kvcompress.cache.storage.fixed import FixedSlotCache
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.cache.storage.residual import ResidualSlots
from kvcompress.engine.static import CapturedDecode, decode_step
from tests.conftest import assert_graph_replay_equals_eager, greedy_steps, spec_of, static_prefill, tiny_model

prefill, steps = static_prefill, greedy_steps
KIVI = dict(bits=2, group_size=4, key_axis="channel", value_axis="token")


@pytest.fixture
def masked(monkeypatch):
    """Uncompiled steps attend as a traced step must (``fixed.capturing()``: no host read, so over the whole
    capacity, empty slots masked): a traced step is compared with the same arithmetic run eagerly."""
    from kvcompress.cache.storage import fixed, residual
    for module in (fixed, residual):
        monkeypatch.setattr(module, "capturing", lambda: True)


@torch.inference_mode()
def test_static_cache_equals_the_full_cache():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 12))
    full, static = FullCache(), StaticKVCache(capacity=24)
    a, b = prefill(model, full, tokens), prefill(model, static, tokens)
    assert torch.equal(b, a)
    nxt = a[:, -1:].argmax(-1)
    assert torch.equal(steps(model, static, nxt, 12, 6), steps(model, full, nxt, 12, 6))
    assert static.tokens_seen == full.tokens_seen == 2 * 18
    assert int(static.index) == 18 and static.kv_bytes() == sum(t.nbytes for t in static.tensors())


@torch.inference_mode()
def test_traced_decode_step_is_one_graph_and_equals_eager(masked):
    """fullgraph=True fails on any graph break or data-dependent branch: what a CUDA graph cannot record."""
    torch._dynamo.reset()
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 8))
    eager, traced = StaticKVCache(capacity=16), StaticKVCache(capacity=16)
    prefill(model, eager, tokens)
    nxt = prefill(model, traced, tokens)[:, -1:].argmax(-1)
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    want, got = steps(model, eager, nxt, 8, 4), steps(model, traced, nxt, 8, 4, compiled)
    assert torch.equal(got, want)
    for x, y in zip(traced.tensors(), eager.tensors(), strict=True):
        assert torch.equal(x, y)


@torch.inference_mode()
def test_captured_decode_falls_back_to_eager_off_cuda():
    """Also with one positions tensor advanced in place (the rotary memo is keyed by identity)."""
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 5))
    cache, ref = StaticKVCache(capacity=10), StaticKVCache(capacity=10)
    first = prefill(model, cache, tokens)[:, -1:].argmax(-1)
    prefill(model, ref, tokens)
    step = CapturedDecode(model, cache, 2)
    assert not step.captured
    nxt, pos, got = first, torch.full((2, 1), 5), []
    for _ in range(4):
        got.append(step(nxt, pos).clone())
        nxt = got[-1][:, -1:].argmax(-1)
        pos += 1
    assert torch.equal(torch.cat(got, 1), steps(model, ref, first, 5, 4))


def test_capacity_is_checked():
    with pytest.raises(ValueError, match="capacity"):
        StaticKVCache(capacity=0)
    with pytest.raises(ValueError, match="max_position"):
        StaticKVCache(capacity=10**6).setup(spec_of(tiny_model()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs CUDA")
@pytest.mark.parametrize("kind", ["dense", "int4", "kivi"])
@torch.inference_mode()
def test_cuda_graph_replay_equals_eager(kind):
    """Dense, the per-token int4 codec in fixed slots, and KIVI's residual stage (a flush every 4 tokens)."""
    make = {"dense": lambda: StaticKVCache(capacity=16, device="cuda"),
            "int4": lambda: FixedSlotCache(QuantizedStore(group_size=8).codec(), 16, device="cuda"),
            "kivi": lambda: ResidualSlots(QuantizedStore(residual=3, **KIVI), 16, device="cuda")}[kind]
    assert_graph_replay_equals_eager(tiny_model().cuda(), make(), make(), torch.randint(0, 97, (2, 8), device="cuda"))


def speed(stories, cache, **kw):
    from kvcompress.eval.base import EvalContext
    from kvcompress.eval.data import default_data_dir
    from kvcompress.eval.speed import Speed

    model, tok = stories
    cache.setup(model.config.spec())
    ev = Speed(context=32, decode_tokens=5, repeats=1, dataset="tinystories", **kw)
    ev.check(model.config.spec(), default_data_dir())
    return ev.run(EvalContext(model, tok, cache, default_data_dir(), progress=False))


def test_auto_picks_the_captured_graph_on_cuda_and_the_compiled_step_on_a_cpu():
    from kvcompress.eval.speed import auto_path

    assert [auto_path(True, d) for d in ("cuda", "cpu", "mps")] == ["graph", "compiled", "eager"]
    assert {auto_path(False, d) for d in ("cuda", "cpu")} == {"eager"}  # no static form: the cache's own step


def test_speed_on_the_static_path_keeps_the_perplexity(stories, capsys):
    eager = speed(stories, FullCache())
    static = speed(stories, FullCache(), decode_path="graph")
    assert eager["decode_path"] == "eager" and static["decode_path"] == "static"  # no CUDA graph on CPU
    assert abs(static["ppl"] - eager["ppl"]) < 1e-4 * eager["ppl"]
    assert speed(stories, ComposedCache(layout=CLA(group_size=2)), decode_path="auto")["decode_path"] == "eager"
    assert "runs eager" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval.decode_path"):  # sharing changes what a layer reads: no static form
        speed(stories, ComposedCache(layout=CLA(group_size=2)), decode_path="graph")
    with pytest.raises(ValueError, match="eval.decode_path"):
        speed(stories, FullCache(), decode_path="fast")


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, True)])
@torch.inference_mode()
def test_static_quant_cache_equals_the_quantized_storage(bits, symmetric):
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 12))
    eager = ComposedCache(QuantizedStore(bits=bits, group_size=8, symmetric=symmetric))
    a = prefill(model, eager, tokens)
    static = eager.static_form(20)  # the per-token codec in fixed slots
    b = prefill(model, static, tokens)
    assert torch.equal(b, a)
    nxt = a[:, -1:].argmax(-1)
    assert torch.equal(steps(model, static, nxt, 12, 5), steps(model, eager, nxt, 12, 5))
    per_slot = 16 * bits // 8 + 2 * (16 // 8) * (1 if symmetric else 2)  # codes, fp16 scales (and zeros)
    held = 2 * 3 * 2 * 2 * 20 * per_slot  # K and V x layers x rows x kv heads x capacity
    assert static.kv_bytes() == held + static.pos.nbytes + static.index.nbytes  # per-token, residual 0: codes only


@torch.inference_mode()
def test_static_quant_decode_step_traces_as_one_graph(masked):
    torch._dynamo.reset()
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 6))
    eager, traced = (FixedSlotCache(QuantizedStore(group_size=8).codec(), 12) for _ in range(2))
    prefill(model, eager, tokens)
    nxt = prefill(model, traced, tokens)[:, -1:].argmax(-1)
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    assert torch.equal(steps(model, traced, nxt, 6, 3, compiled), steps(model, eager, nxt, 6, 3))


def test_static_forms_follow_the_axes():
    """Only identity policy and layout, and a storage that declares one, have a static form."""
    spec = spec_of(tiny_model())
    def form(**axes):
        cache = ComposedCache(**axes)
        cache.setup(spec)
        return cache.static_form(32)
    assert isinstance(form(), StaticKVCache)
    q = form(storage=QuantizedStore(bits=4, group_size=8))  # per-token codes: the codec in fixed slots
    assert isinstance(q, FixedSlotCache) and {(c.bits, c.group_size) for c in q.store.configs.values()} == {(4, 8)}
    kivi = form(storage=QuantizedStore(bits=2, group_size=8, key_axis="channel", residual=16))
    assert isinstance(kivi, ResidualSlots)  # per-channel groups and a residual: the residual stage's form
    assert [c.cfg.axis for c in kivi.store.side_codecs()] == ["channel", "token"] and kivi.store.residual == 16
    assert not kivi.slot_addressable
    assert form(storage=QuantizedStore(bits=4, group_size=8, keys="pre_rope")) is None  # rotated at read time
    assert form(policy=SnapKV(budget=16)) is None and form(layout=CLA(group_size=2)) is None




@pytest.mark.parametrize("residual,chunk", [(0, None), (3, None), (6, 4), (32, 5)])
@torch.inference_mode()
def test_static_kivi_cache_equals_the_kivi_storage(residual, chunk):
    """Per-channel key groups and a full-precision residual: every flush (prefill chunks and single-token steps)
    leaves the eager storage's codes, so the logits match; residual 32 > every length quantizes nothing."""
    from kvcompress.engine.generate import forward_chunks

    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 13))
    eager = ComposedCache(QuantizedStore(residual=residual, **KIVI))
    eager.setup(spec_of(model))
    static = eager.static_form(24)
    assert isinstance(static, ResidualSlots)
    static.setup(spec_of(model))
    for cache in (eager, static):
        cache.reset(2)
    a, b = (forward_chunks(model, tokens, c, chunk) for c in (eager, static))
    assert torch.equal(b, a)
    nxt = a[:, -1:].argmax(-1)
    assert torch.equal(steps(model, static, nxt, 13, 9), steps(model, eager, nxt, 13, 9))
    store, (k, v) = eager.views[0], static.sides  # layer 0: its K/V do not depend on attention's rounding
    n = int(static.index)
    for part, side in ((k, store.k), (v, store.v)):
        assert part.split(n) == side.n_q
        if side.n_q:
            for name, held in side.parts.view().items():
                assert torch.equal(part.parts[name][0][:, :, : held.shape[2]], held)
        assert torch.equal(part.res[0][:, :, : n - side.n_q], side.res)


@pytest.mark.parametrize("rank", [0, 2])
@torch.inference_mode()
def test_gear_in_fixed_slots_equals_the_gear_storage(rank):
    """GEAR's blocks (codes, per-channel scales, rank-r factors, outliers: parts with per-token, per-group and
    per-block rows) in the same residual stage: fixed slots equal the eager storage. Rank 0 is GEAR's captured
    form; a rank codes blocks with an SVD (a host sync on CUDA), so ``static_form`` refuses it."""
    from kvcompress.cache.storage.gear import GEARStore
    from kvcompress.engine.generate import forward_chunks

    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 13))
    eager = ComposedCache(GEARStore(bits=4, group_size=4, block_size=8, rank=rank, outlier_fraction=0.05, residual=3))
    eager.setup(spec_of(model))
    assert (eager.static_form(24) is None) == bool(rank)
    refusal = eager.storage.report().get("gear_captured_form", "")
    assert ("storage.rank" in refusal) == bool(rank)  # the refusal names the setting
    static = ResidualSlots(eager.storage, 24)
    static.setup(spec_of(model))
    for cache in (eager, static):
        cache.reset(2)
    a, b = (forward_chunks(model, tokens, c, 5) for c in (eager, static))
    assert torch.equal(b, a)
    nxt = a[:, -1:].argmax(-1)
    assert torch.equal(steps(model, static, nxt, 13, 9), steps(model, eager, nxt, 13, 9))
    assert static.sides[0].n_q == eager.views[0].k.n_q == 16  # 22 tokens, 3 recent: two blocks of 8 coded


@torch.inference_mode()
def test_static_kivi_decode_step_traces_as_one_graph(masked):
    """The flush is a device-side flag, not a Python branch: one graph, equal to eager, across flushes."""
    torch._dynamo.reset()
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 6))
    make = lambda: ResidualSlots(QuantizedStore(residual=3, **KIVI), 20)
    eager, traced = make(), make()
    prefill(model, eager, tokens)
    nxt = prefill(model, traced, tokens)[:, -1:].argmax(-1)
    compiled = torch.compile(decode_step, fullgraph=True, backend="eager")
    assert torch.equal(steps(model, traced, nxt, 6, 9, compiled), steps(model, eager, nxt, 6, 9))


def user_fp8_store():
    """The fp8 storage exactly as a user writes it (``tests/user_methods/my_methods/fp8.py``, the example that
    ``storage.codec``'s docstring points to)."""
    path = Path(__file__).resolve().parent / "user_methods/my_methods/fp8.py"
    scope: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)  # noqa: S102 - the documented example itself
    return scope["Fp8Store"]


@torch.inference_mode()
def test_a_user_codec_gets_both_decode_paths():
    """A user's codec (the documented fp8 store: real 1-byte float8 parts) decodes eagerly, in fixed slots (equal to
    eager), and under an eviction policy's static form, with no edit to kvcompress."""
    from kvcompress.cache.policy.h2o import H2O
    from kvcompress.cache.storage.fixed import FixedSlotCache

    Fp8Store = user_fp8_store()
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 12))
    eager = ComposedCache(Fp8Store())
    eager.setup(spec_of(model))
    static = eager.static_form(24)
    assert isinstance(static, FixedSlotCache)
    static.setup(spec_of(model))
    a, b = prefill(model, eager, tokens), prefill(model, static, tokens)
    assert torch.equal(b, a)
    nxt = a[:, -1:].argmax(-1)
    assert torch.equal(steps(model, static, nxt, 12, 4), steps(model, eager, nxt, 12, 4))
    assert {t.dtype for t in eager.tensors()} >= {torch.float8_e4m3fn}
    assert eager.kv_bytes() == sum(t.nbytes for t in eager.tensors())
    full = prefill(model, FullCache(), tokens)
    assert 0 < (a - full).abs().max() < 0.5  # lossy, but close
    evicting = ComposedCache(Fp8Store(), H2O(budget=6))
    evicting.setup(spec_of(model))
    assert torch.isfinite(prefill(model, evicting, tokens)).all()  # eager eviction gathers the float8 parts
    assert max(evicting.policy.held.values()) <= 6 + evicting.policy.slack
    form = evicting.static_form(24)
    assert form is not None and type(form).__name__ == "StaticEvictionCache"
    form.setup(spec_of(model))
    assert torch.isfinite(prefill(model, form, tokens)).all()
    with pytest.raises(ValueError, match="capacity"):
        FixedSlotCache(Fp8Store(), 0)
