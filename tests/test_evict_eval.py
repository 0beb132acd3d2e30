"""eval=prefill_decode and eval=passkey, and eviction really happening inside eval=ppl (stories260K)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, STORIES, spec_of
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.policy.h2o import H2O
from kvcompress.cache.policy.snapkv import SnapKV
from kvcompress.cache.policy.streaming import StreamingLLM
from kvcompress.engine.generate import forward_chunks
from kvcompress.eval import passkey as passkey_mod
from kvcompress.eval.base import EvalContext
from kvcompress.eval.passkey import NEEDLE, QUESTION, Passkey, passkey_prompt
from kvcompress.eval.ppl import Perplexity
from kvcompress.eval.prefill_decode import PrefillDecode, continuation_nll

TEXT = SHARED / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.first100.txt"
CONF = Path(__file__).resolve().parents[1] / "conf"


def h2o(**kw) -> ComposedCache:
    """Dense storage, one store per layer, evicted by H2O."""
    return ComposedCache(policy=H2O(**kw))


def snapkv(**kw) -> ComposedCache:
    return ComposedCache(policy=SnapKV(**kw))


def streaming(**kw) -> ComposedCache:
    return ComposedCache(policy=StreamingLLM(**kw))


def storage(name: str, **settings):
    """A storage from its YAML (conf/storage/<name>.yaml) with settings overridden, as kvc builds it."""
    return instantiate(OmegaConf.merge(OmegaConf.load(CONF / "storage" / f"{name}.yaml"), settings), _convert_="all")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


def ready(cache, model, batch=1):
    cache.setup(spec_of(model))
    cache.reset(batch)
    return cache


def ctx(stories, cache) -> EvalContext:
    return EvalContext(stories[0], stories[1], ready(cache, stories[0]), SHARED / "data", seed=0, progress=False)


# -- prefill_decode ------------------------------------------------------------------------------
def test_prefill_decode_full_cache_equals_one_forward(stories, story_tokens):
    model = stories[0]
    toks = torch.cat([story_tokens[:, :80], story_tokens[:, 100:180]])  # two rows
    context = 64
    total, first, _ = continuation_nll(model, toks, ready(FullCache(), model, 2), context, prefill_chunk=24)
    logits = forward_chunks(model, toks, ready(FullCache(), model, 2))
    want = F.cross_entropy(logits[:, context - 1 : -1].reshape(-1, logits.shape[-1]).float(),
                           toks[:, context:].reshape(-1), reduction="sum")
    want_first = F.cross_entropy(logits[:, context - 1].float(), toks[:, context], reduction="sum")
    assert total == pytest.approx(float(want), rel=1e-5) and first == pytest.approx(float(want_first), rel=1e-5)


@pytest.mark.parametrize("when,held", [("prefill", 16 + 16 - 2), ("both", 16), ("decode", 16)])
def test_prefill_decode_compresses_at_prefill_end(stories, story_tokens, when, held):
    model = stories[0]
    toks = story_tokens[:, :80]
    cache = ready(snapkv(budget=16, window=8, when=when), model)
    _, _, memory = continuation_nll(model, toks, cache, 64, prefill_chunk=32)
    assert memory["tokens_held_max"] == held and memory["evictions"] > 0
    big = ready(h2o(budget=10_000, when=when), model)
    a = continuation_nll(model, toks, big, 64, prefill_chunk=32)[0]
    b = continuation_nll(model, toks, ready(FullCache(), model), 64, prefill_chunk=32)[0]
    assert a == pytest.approx(b, rel=1e-5)


def test_prefill_decode_run_and_check(stories):
    ev = PrefillDecode(dataset=str(TEXT), context=96, continuation=8, samples=3, batch_size=2, prefill_chunk=32)
    m = ev.run(ctx(stories, streaming(budget=32, when="prefill")))
    assert m["n_tokens"] == 24 and m["n_samples"] == 3 and 1 < m["ppl"] < 1e4 and m["evictions"] > 0
    assert m["ppl/ci_low"] <= m["ppl"] <= m["ppl/ci_high"]  # two batches: the bootstrap's units
    spec = spec_of(stories[0])
    for bad, name in ((dict(context=510), "eval.context"), (dict(continuation=0), "eval.continuation"),
                      (dict(samples=0), "eval.samples"), (dict(dataset="nope"), "dataset"),
                      (dict(bootstrap=-1), "eval.bootstrap")):
        with pytest.raises(ValueError, match=name):
            PrefillDecode(**{"context": 64, "continuation": 8, **bad}).check(spec, SHARED / "data")


# -- passkey -------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [420, 501])
def test_passkey_prompt_length_and_depth(stories, length):
    tok = stories[1]
    needle = tok(NEEDLE.format(key="12345"), add_special_tokens=False).input_ids
    tail = tok(QUESTION, add_special_tokens=False).input_ids

    def where(ids):
        return next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)

    at = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ids = passkey_prompt(tok, length, depth, "12345", bos=1)
        assert len(ids) == length and ids[0] == 1 and ids[-len(tail) :] == tail
        at.append(where(ids))
    assert at == sorted(at) and len(set(at)) == 5
    assert at[-1] == length - len(tail) - len(needle)  # depth 100%: right before the question
    with pytest.raises(ValueError, match="eval.lengths"):
        passkey_prompt(tok, 150, 0.5, "12345", None)


def test_passkey_scores_per_depth_and_length(stories, monkeypatch):
    """An oracle that finds the key only in the first half of the prompt: depth 0 right, depth 100 wrong."""
    tok = stories[1]

    def oracle(model, prompts, cache, max_new_tokens, chunk=None):
        outs = []
        for p in prompts:
            text = tok.decode(p[: len(p) // 2])
            key = passkey_mod.first_number(text.split("pass key is")[1]) if "pass key is" in text else "0"
            outs.append(tok(" " + key + ".", add_special_tokens=False).input_ids)
        return outs

    monkeypatch.setattr(passkey_mod, "generate", oracle)
    ev = Passkey(lengths=[400, 500], depths=[0.0, 1.0], trials=3, digits=4)
    m = ev.run(ctx(stories, FullCache()))
    assert (m["acc_depth0"], m["acc_depth100"], m["accuracy"], m["n_prompts"]) == (1.0, 0.0, 0.5, 12)
    assert m["acc_len400_depth0"] == m["acc_len500_depth0"] == 1.0 and m["acc_len500"] == 0.5


def test_passkey_big_budget_equals_full_and_check(stories):
    ev = Passkey(lengths=[256], depths=[0.0, 1.0], trials=2, prefill_chunk=64)
    full = ev.run(ctx(stories, FullCache()))
    same = ev.run(ctx(stories, h2o(budget=10_000, when="prefill")))
    assert {k: v for k, v in full.items() if k.startswith("acc")} == {k: v for k, v in same.items() if
                                                                      k.startswith("acc")}
    small = ev.run(ctx(stories, snapkv(budget=32, window=8, when="prefill")))
    assert small["evictions"] > 0 and small["tokens_held_max"] <= 32 + ev.digits + 2
    spec = spec_of(stories[0])
    for bad, name in ((dict(lengths=[100]), "eval.lengths"), (dict(lengths=[600]), "eval.lengths"),
                      (dict(depths=[1.5]), "eval.depths"), (dict(trials=0), "eval.trials")):
        with pytest.raises(ValueError, match=name):
            Passkey(**{"lengths": [256], **bad}).check(spec, SHARED / "data")


# -- eviction inside eval=ppl, and over quantized storage ----------------------------------------
def test_ppl_window_beyond_budget_really_evicts(stories):
    ev = Perplexity(dataset=str(TEXT), window=96, max_windows=2, chunk=8, batch_size=2)
    full = ev.run(ctx(stories, FullCache()))
    decode = ev.run(ctx(stories, h2o(budget=24)))
    assert decode["evictions"] > 0 and decode["tokens_held_max"] == 24 and decode["ppl"] != full["ppl"]
    with pytest.raises(ValueError, match="eval=prefill_decode"):  # teacher-forced windows have no prompt to end
        ev.check_cache(h2o(budget=24, when="prefill"))


@pytest.mark.parametrize("name", ["int4", "kivi"])
def test_eviction_over_quantized_storage(stories, story_tokens, name):
    params = {"group_size": 8} if name == "int4" else {"group_size": 8, "residual": 8}
    model = stories[0]
    cache = ready(ComposedCache(storage(name, **params), H2O(budget=20, per_head=True)), model, 2)
    toks = torch.cat([story_tokens[:, :48], story_tokens[:, 48:96]])
    forward_chunks(model, toks, cache, 4)
    assert [view.length for view in cache.views] == [20] * model.config.num_layers and cache.policy.evictions > 0
    pos = cache.views[1].positions()
    assert pos.shape == (2, 4, 20) and (pos.diff(dim=-1) > 0).all() and (pos < 48).all()


def test_kvc_bad_budget_fails_before_weights_load(tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    cmd = [sys.executable, "-m", "kvcompress.run", "model=local", f"model.source={folder}", "policy=h2o",
           "policy.budget=0", "progress=false", f"results_dir={tmp_path}/results", f"hydra.run.dir={tmp_path}/run"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 1 and "policy.budget must be a token count >= 1" in out.stderr
    rec = json.loads(Path(tmp_path / "results" / "records.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "failed" and "weights" not in rec["error"]


def test_prefill_decode_never_ends_prefill_with_one_token(stories, story_tokens):
    """context = 2 x chunk + 1: the last prompt token joins the previous chunk, so when=prefill compresses
    at the first continuation token, as with any other chunking."""
    model = stories[0]
    toks = story_tokens[:, :73]
    held = [continuation_nll(model, toks, ready(h2o(budget=16, when="prefill"), model), 65, c)[2]
            for c in (32, None)]
    assert held[0]["tokens_held_max"] == held[1]["tokens_held_max"] == 16 + 8 - 2
