"""The compiled CPU decode step (``kvcompress.engine.compiled``): its logits equal the eager static step's, and a
step that cannot compile runs eagerly and says why.

Compiling costs seconds to minutes on a loaded 2-core CPU, so CI compiles one step for the whole module (the full
cache on the tiny model, batch 2); every other combination with a static form is in the ``slow`` suite at the end.
"""
from __future__ import annotations

import pytest
import torch

from kvcompress.cache.static import StaticKVCache
from kvcompress.engine.compiled import CompiledDecode
from kvcompress.engine.rope import RotaryEmbedding
from tests.conftest import greedy_steps, static_prefill, tiny_model

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
def full_cache_run():
    torch.manual_seed(0)
    model = tiny_model()
    return compiled_against_eager(model, lambda: StaticKVCache(capacity=16), torch.randint(0, 97, (2, 8)))


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


def test_dynamic_ntk_rope_runs_eager_and_says_why(capsys):
    model = tiny_model()
    c = model.config
    model.rope = RotaryEmbedding(c.head_dim, c.rope_theta, {"rope_type": "dynamic", "factor": 2.0}, c.max_position)
    cache = StaticKVCache(capacity=12)
    static_prefill(model, cache, torch.randint(0, 97, (1, 6)))
    step = CompiledDecode(model, cache, 1)
    assert not step.compiled and "dynamic" in step.reason and "dynamic" in capsys.readouterr().err
