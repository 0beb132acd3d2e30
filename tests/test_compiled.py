"""The compiled CPU decode step (``kvcompress.engine.compiled``): its logits equal the eager static step's, and a
step that cannot compile runs eagerly and says why.

Compiling (Inductor with freezing and max_autotune, the production options) took 5-10 minutes for the tiny model on
the shared 2-core CPU, even with the disk cache warm, so every test that compiles is opt-in (``compiles``: set
``KVC_COMPILE_TESTS=1``; ``slow`` alone still runs in CI): CI runs the fallbacks (which fail before Inductor starts)
and the eval's refusal; the opt-in suite checks the full cache, every storage x policy x layout with a static form,
and the speed eval on the compiled path.
"""
from __future__ import annotations

import os

import pytest
import torch

from kvcompress.cache.storage.dense import StaticKVCache
from kvcompress.engine.compiled import CompiledDecode
from kvcompress.engine.rope import RotaryEmbedding
from tests.conftest import greedy_steps, static_prefill, tiny_model

compiles = pytest.mark.skipif(not os.environ.get("KVC_COMPILE_TESTS"),
                              reason="compiles with Inductor (minutes per shape on 2 cores): set KVC_COMPILE_TESTS=1")

# Inductor reorders fp32 sums (GEMM blocking, fused RMSNorm/softmax reductions): logits agree to ~1e-6 of their
# scale, so 1e-4 absolute and relative; an int code may round the other way on that noise (the slow suite's 1e-3)
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def compiled_against_eager(model, make, tokens, n: int = 4):
    """Prefill ``tokens`` into two equal static caches from ``make()``, compile one's step and run ``n`` greedy
    steps on each: (the compiled step, its logits, the eager step's logits)."""
    eager, compiled = make(), make()
    static_prefill(model, eager, tokens)
    nxt = static_prefill(model, compiled, tokens)[:, -1:].argmax(-1)
    step = CompiledDecode(model, compiled, tokens.shape[0])
    T = tokens.shape[1]
    got = greedy_steps(model, compiled, nxt, T, n, lambda m, t, p, c: step(t, p))
    return step, got, greedy_steps(model, eager, nxt, T, n)


@pytest.fixture(scope="module")
def full_cache_run():  # compiled once for the module
    torch.manual_seed(0)
    model = tiny_model()
    return compiled_against_eager(model, lambda: StaticKVCache(capacity=16), torch.randint(0, 97, (2, 8)))


@compiles
def test_the_compiled_full_cache_step_equals_the_eager_step(full_cache_run):
    step, got, want = full_cache_run
    assert step.compiled and step.reason is None and step.compile_s > 0
    torch.testing.assert_close(got, want, **TOLERANCE)


class HostSyncCache(StaticKVCache):
    """A static cache whose attend reads its write index on the host: a graph break, so no compiled form."""

    def attend(self, layer, q, q_pos):
        if int(self.index) < 0:
            raise AssertionError
        return super().attend(layer, q, q_pos)


def test_a_step_that_cannot_compile_runs_eager_and_says_why(capsys):
    model = tiny_model()
    step, got, want = compiled_against_eager(model, lambda: HostSyncCache(capacity=12), torch.randint(0, 97, (1, 6)),
                                             n=2)
    assert not step.compiled and step.reason
    assert "runs eagerly" in capsys.readouterr().err
    assert torch.equal(got, want)


def test_inductor_caches_go_to_the_kvcompress_folder_unless_named(monkeypatch):
    """Importing torch._inductor writes torch's /tmp default into TORCHINDUCTOR_CACHE_DIR: that value counts as
    unset (the compiled kernels and autotuning choices then persist under ~/.cache/kvcompress/inductor)."""
    import torch._inductor.config  # noqa: F401 - the import that sets torch's default
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from kvcompress.engine.compiled import CACHE_DIR, use_disk_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert use_disk_cache() == os.path.expanduser(CACHE_DIR)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere/inductor")
    assert use_disk_cache() == "/elsewhere/inductor"


def test_dynamic_ntk_rope_runs_eager_and_says_why(capsys):
    model = tiny_model()
    c = model.config
    model.rope = RotaryEmbedding(c.head_dim, c.rope_theta, {"rope_type": "dynamic", "factor": 2.0}, c.max_position)
    cache = StaticKVCache(capacity=12)
    static_prefill(model, cache, torch.randint(0, 97, (1, 6)))
    step = CompiledDecode(model, cache, 1)
    assert not step.compiled and "dynamic" in step.reason and "dynamic" in capsys.readouterr().err


def test_the_speed_eval_refuses_compiled_for_a_cache_without_a_static_form(stories):
    from kvcompress.cache import ComposedCache
    from kvcompress.cache.layout.cla import CLA
    from tests.test_static import speed

    with pytest.raises(ValueError, match="eval.decode_path"):  # sharing layouts have no static form
        speed(stories, ComposedCache(layout=CLA(group_size=2)), decode_path="compiled")


@compiles
def test_the_speed_eval_on_the_compiled_path_keeps_the_perplexity(stories):
    from kvcompress.cache import FullCache
    from tests.test_static import speed

    eager, compiled = speed(stories, FullCache()), speed(stories, FullCache(), decode_path="compiled")
    assert compiled["decode_path"] == "compiled" and compiled["compile_s"] > 0 == eager["compile_s"]
    assert abs(compiled["ppl"] - eager["ppl"]) < 1e-4 * eager["ppl"]


def static_combinations():
    from tests.test_axes import COMBOS, has_static_form

    return [c for c in COMBOS if c != ("dense", "none", "per_layer") and has_static_form(*c)]


@compiles
@pytest.mark.parametrize("storage,policy,layout", static_combinations())
def test_every_static_form_compiles_to_the_eager_step(tmp_path, storage, policy, layout):
    """The contract matrix's combinations with a static form: the compiled step's logits equal the eager static
    step's (int codes may round the other way on fp-reordering noise: 1e-3)."""
    from kvcompress.testing import build
    from kvcompress.testing.contract import tiny_model as contract_model
    from tests.test_axes import combination

    model = contract_model()
    cache = build(model, combination(storage, policy, layout), tmp_path)
    g = torch.Generator().manual_seed(5)
    tokens = torch.stack([torch.randperm(model.config.vocab_size, generator=g)[:40] for _ in range(2)])
    step, got, want = compiled_against_eager(model, lambda: cache.static_form(48), tokens)
    assert step.compiled, step.reason
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def outward_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The definition: the nearest fp16, moved by ``torch.nextafter`` (eagerly exact) where on the wrong side."""
    h = x.clamp(-65504.0, 65504.0).half()
    off = (h.float() < x) if up else (h.float() > x)
    return torch.where(off, torch.nextafter(h, torch.full_like(h, float("inf") if up else float("-inf"))), h)


EDGES = torch.tensor([0.0, -0.0, 2.0**-25, -(2.0**-25), 2.0**-24, 1.0, -1.0, 65504.0, -65504.0, 7e4, -7e4])


@pytest.mark.parametrize("up", [True, False])
def test_the_quantizers_outward_fp16_rounding_is_nextafters(up):
    from kvcompress.kernels.reference import round_fp16

    x = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(0)) * s for s in (1e-6, 3.0, 1e3)])
    x = torch.cat([x, EDGES])
    assert torch.equal(round_fp16(x, up), outward_fp16(x, up))


@compiles
@pytest.mark.parametrize("up", [True, False])
def test_the_compiled_outward_fp16_rounding_is_the_eager_one(up):
    """Under the compile options the quantizer's fp16 scales come out as eagerly (Inductor folds x.half().float()
    into x without ``emulate_precision_casts``, and its fp16 ``nextafter`` returns its input)."""
    from kvcompress.engine.compiled import COMPILE_OPTIONS
    from kvcompress.kernels.reference import round_fp16

    x = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(1)) * 3.0, EDGES])
    options = {k: v for k, v in COMPILE_OPTIONS.items() if k == "emulate_precision_casts"}
    assert torch.equal(torch.compile(lambda t: round_fp16(t, up), fullgraph=True, options=options)(x),
                       outward_fp16(x, up))
