"""The engine session: an explicit prompt boundary (prefill-time eviction fires under teacher forcing too, and an
evaluation without a prompt refuses it before weights load), KVzip's replay wherever the session prefills, eager
and captured decode, teacher-forced scoring (stories260K and tiny random models)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import SHARED, STORIES, spec_of, tiny_model

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.policy.kvzip import KVzip
from kvcompress.cache.policy.snapkv import SnapKV
from kvcompress.engine.generate import Sampling, forward_chunks, generate
from kvcompress.engine.session import Session, chunk_bounds
from kvcompress.eval.base import EvalContext
from kvcompress.eval.fidelity import Fidelity
from kvcompress.eval.lm_model import KVCompressLM, Loaded
from kvcompress.eval.passkey import Passkey
from kvcompress.eval.ppl import Perplexity
from kvcompress.eval.prefill_decode import PrefillDecode, continuation_nll
from kvcompress.eval.ruler.decode import answer
from kvcompress.eval.speed import Speed
from kvcompress.eval.throughput import Throughput

TEXT = SHARED / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.first100.txt"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


def ready(policy, model, batch=1) -> ComposedCache:
    cache = ComposedCache(policy=policy)
    cache.setup(spec_of(model))
    cache.reset(batch)
    return cache


def held(cache) -> int:
    return max(v.length for v in cache.stores())


# -- the prompt boundary -------------------------------------------------------------------------
def test_chunk_bounds():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)] and chunk_bounds(9, 4, True) == [(0, 4), (4, 9)]
    assert chunk_bounds(9, 4) == [(0, 4), (4, 8), (8, 9)] and chunk_bounds(5, None) == [(0, 5)]
    assert chunk_bounds(0, None) == []


def test_a_one_token_chunk_is_not_a_prompt_end():
    """The end of a prompt was guessed (a 1-token step after a multi-token one): 41 tokens in chunks of 8 compressed
    before the last prompt token. Now only ``end_prompt`` ends it."""
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 41), generator=torch.Generator().manual_seed(0))
    cache = ready(H2O(budget=16, when="prefill"), model)
    forward_chunks(model, tokens, cache, 8)
    assert cache.policy.evictions == 0 and held(cache) == 41
    cache.end_prompt()
    forward_chunks(model, tokens[:, :3], cache, 3, start=41)  # the next step, of any size, compresses
    assert cache.policy.evictions == model.config.num_layers and held(cache) == 16  # once per layer


@pytest.mark.parametrize("when,after", [("prefill", 16 + 16), ("both", 16)])
def test_teacher_forced_scoring_after_a_prompt_compresses(when, after):
    """Prefill, end the prompt, then score the rest teacher-forced in chunks of 8: ``when=prefill`` compresses at the
    first scored chunk (which it keeps: budget + 8, then grows), ``both`` evicts at every chunk after."""
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 64), generator=torch.Generator().manual_seed(1))
    session = Session(model, ready(H2O(budget=16, when=when), model, 2)).start(2)
    session.prefill(tokens[:, :40], chunk=16)
    assert session.cache.policy.evictions == 0 and held(session.cache) == 40
    session.score(tokens[:, 40:], chunk=8, start=40)
    assert session.cache.policy.evictions >= 1 and held(session.cache) == after


def test_prefill_decode_teacher_forced_continuation_evicts(stories):
    """The issue's reproduction on a teacher-forced path: eval=prefill_decode with the continuation scored in
    chunks of 8 (no 1-token step anywhere) compresses at the prompt's end; with the full cache every
    continuation_chunk gives the same perplexity."""
    ctx = EvalContext(stories[0], stories[1], None, SHARED / "data", progress=False)
    ev = PrefillDecode(dataset=str(TEXT), context=96, continuation=32, samples=2, prefill_chunk=32,
                       continuation_chunk=8)
    ctx.cache = ready(SnapKV(budget=0.25, when="prefill"), stories[0])
    m = ev.run(ctx)
    assert m["evictions"] > 0 and m["tokens_held_max"] < 96 and m["n_tokens"] == 64
    ctx.cache = ready(None, stories[0])
    full = [PrefillDecode(dataset=str(TEXT), context=96, continuation=32, samples=2, prefill_chunk=32,
                          continuation_chunk=c).run(ctx)["ppl"] for c in (1, 8, 32)]
    assert full[1] == pytest.approx(full[0], rel=1e-5) and full[2] == pytest.approx(full[0], rel=1e-5)
    with pytest.raises(ValueError, match="eval.continuation_chunk"):
        PrefillDecode(context=64, continuation=8, continuation_chunk=9).check(spec_of(stories[0]), SHARED / "data")


# -- evaluations without a prompt refuse prefill-time policies, before weights load ------------------
@pytest.mark.parametrize("evaluation", [Perplexity(), Fidelity()])
def test_teacher_forced_evaluations_refuse_prefill_time_policies(evaluation):
    for when in ("prefill", "both"):
        with pytest.raises(ValueError, match=r"policy.when=prefill\|both .* eval=(ppl|fidelity) has no prompt"
                                             r".*eval=prefill_decode"):
            evaluation.check_cache(ComposedCache(policy=SnapKV(budget=0.25, when=when)))
    evaluation.check_cache(ComposedCache(policy=SnapKV(budget=0.25, when="decode")))
    evaluation.check_cache(FullCache())
    PrefillDecode().check_cache(ComposedCache(policy=SnapKV(budget=0.25, when="prefill")))  # it has a prompt


@pytest.mark.parametrize("evaluation", ["ppl", "fidelity"])
def test_kvc_refuses_when_prefill_under_teacher_forcing_before_weights_load(tmp_path, evaluation):
    """The issue's command (``policy=snapkv policy.budget=0.25 policy.when=prefill``, eval=ppl) measured the full
    cache under SnapKV's name (evictions 0); it now fails before any weights load (there are none here)."""
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    cmd = [sys.executable, "-m", "kvcompress.run", "model=local", f"model.source={folder}", "policy=snapkv",
           "policy.budget=0.25", "policy.when=prefill", f"eval={evaluation}", "eval.dataset=tinystories",
           "eval.window=128", "eval.max_windows=4", "progress=false", f"results_dir={tmp_path}/results",
           f"hydra.run.dir={tmp_path}/run"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 1 and "eval=prefill_decode" in out.stderr, out.stderr[-2000:]
    rec = json.loads((tmp_path / "results" / "records.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "failed" and "has no prompt" in rec["error"] and "weights" not in rec["error"]


# -- KVzip's replay wherever the session prefills ------------------------------------------------------
def kvzip(model, batch=1) -> ComposedCache:
    return ready(KVzip(budget=16, when="prefill"), model, batch)


def test_replay_runs_wherever_the_session_prefills(stories):
    model, tok = stories
    prompt = tok(TEXT.read_text()[:400]).input_ids[:60]
    drivers = {  # each: (drive the cache, the prompt's length)
        "generate": (lambda cache: generate(model, [prompt], cache, 3, chunk=16), 60),
        "ruler": (lambda cache: answer(model, cache, [prompt], [prompt[:4]], 3, chunk=16), 60),
        "prefill_decode": (lambda cache: continuation_nll(model, torch.tensor([prompt]), cache, 50, 16), 50),
        "lm_eval": (lambda cache: KVCompressLM(batch_size=1, chunk=16, loaded=Loaded(
            model, tok, cache, "stories260k", "kvzip"))._generate([prompt], [], 3, Sampling()), 60),
        "speed": (lambda cache: Speed(context=48, decode_tokens=4, repeats=1, warmup=False, dataset="tinystories")
                  .run(EvalContext(model, tok, cache, SHARED / "data", progress=False)), 48),
        "throughput": (lambda cache: Throughput(context=40, decode_tokens=3, repeats=1, kv_budget_bytes=10**9,
                                                max_batch=1, probe_batch=1, dataset="tinystories")
                       .run(EvalContext(model, tok, cache, SHARED / "data", progress=False)), 40),
    }
    for where, (drive, length) in drivers.items():
        cache = kvzip(model)
        drive(cache)
        report = cache.memory_report()
        assert report["replay_tokens"] == length and report["evictions"] > 0, where


def test_passkey_replays_and_compresses(stories):
    ctx = EvalContext(stories[0], stories[1], kvzip(stories[0]), SHARED / "data", progress=False)
    m = Passkey(lengths=[256], depths=[0.5], trials=1, prefill_chunk=64).run(ctx)
    assert m["replay_tokens"] == 256 and m["evictions"] > 0


# -- decode paths ----------------------------------------------------------------------------------------
def test_captured_decode_equals_eager():
    """The captured path (the cache's static form; on the CPU the same static step runs eagerly) generates the same
    tokens with the same logits as the eager cache."""
    model = tiny_model()
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 23)]
    steps = {}
    for path in ("eager", "captured"):
        cache = ComposedCache(policy=H2O(budget=20))
        cache.setup(spec_of(model))
        session = Session(model, cache, decode=path, capacity=64)
        logits = []
        out = generate(model, prompts, session, 6, chunk=8)
        session.start(2)
        last, pos = session.prefill(prompts, 8)
        for _ in range(4):
            logits.append(last.clone())
            last = session.step(last.argmax(-1), pos)
            pos = pos + 1
        steps[path] = (out, torch.stack(logits))
    assert steps["eager"][0] == steps["captured"][0]
    torch.testing.assert_close(steps["captured"][1], steps["eager"][1], rtol=1e-5, atol=1e-5)


def test_captured_decode_refuses_a_cache_without_a_static_form():
    model = tiny_model()
    cache = ComposedCache(policy=SnapKV(budget=16, when="prefill"))
    cache.setup(spec_of(model))
    with pytest.raises(ValueError, match="decode=eager"):
        Session(model, cache, decode="captured").start(1)
    with pytest.raises(ValueError, match="eager, captured, compiled"):
        Session(model, cache, decode="graph")


def test_the_session_names_the_step_that_ran():
    """eval=speed and eval=throughput record ``Session.path``: eager, or (no CUDA graph on this CPU) static."""
    model = tiny_model()
    cache = ComposedCache(policy=H2O(budget=20))
    cache.setup(spec_of(model))
    eager, captured = Session(model, cache).start(1), Session(model, cache, decode="captured", capacity=32).start(1)
    assert eager.path == "eager" and eager.cache is cache and eager.compile_s == 0.0
    assert captured.path == ("graph" if torch.cuda.is_available() else "static") and captured.cache is not cache


# -- lm-eval: the request's context is the prompt ------------------------------------------------------
def test_lm_eval_loglikelihood_prompt_is_the_context(stories):
    """A prefill-time policy under lm-eval's loglikelihood compresses the context when it ends (it measured the
    full cache: teacher-forced rows never ended a prompt). The score equals eval=prefill_decode's on the same
    tokens; a budget never reached equals the full cache; a decode-time policy keeps the teacher-forced rows."""
    model, tok = stories
    ids = tok(TEXT.read_text()[:2000]).input_ids
    requests = [(("", ""), ids[:70], ids[70:82]), (("", ""), ids[100:150], ids[150:155]),
                (("", ""), ids[:70], ids[70:71])]

    def loglik(policy):
        cache = ready(policy, model)
        lm = KVCompressLM(batch_size=2, chunk=8, loaded=Loaded(model, tok, cache, "stories260k", "test"))
        return [ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)], cache

    full, _ = loglik(None)
    same, _ = loglik(H2O(budget=10_000, when="prefill"))
    assert same == pytest.approx(full, rel=1e-5, abs=1e-4)
    small, cache = loglik(SnapKV(budget=16, when="prefill"))
    assert cache.policy.evictions > 0 and small[0] != pytest.approx(full[0], rel=1e-4)
    assert small[2] == pytest.approx(full[2], rel=1e-5, abs=1e-4)  # one token: predicted by the prefill itself
    total, _, _ = continuation_nll(model, torch.tensor([ids[:82]]), ready(SnapKV(budget=16, when="prefill"), model),
                                   70, 8, continuation_chunk=8)
    assert small[0] == pytest.approx(-total, rel=1e-5)
