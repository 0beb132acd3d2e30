"""eval=ruler: generated prompts (deterministic, exact length, needles where they say), RULER's scoring, both
protocols, bootstrap intervals, validation before weights load. stories260K-sized, a few seconds each."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, STORIES, spec_of

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.policy.h2o import H2O
from kvcompress.eval.base import EvalContext
from kvcompress.eval.ruler import ALL_TASKS, Ruler, ruler_table
from kvcompress.eval.ruler import evaluation as ruler_eval
from kvcompress.eval.ruler.decode import answer
from kvcompress.eval.ruler.haystack import char_codec, token_codec
from kvcompress.eval.ruler.scoring import string_match_all, string_match_part
from kvcompress.eval.ruler.tasks import TASKS, Haystacks
from kvcompress.eval.stats import mean_ci, ratio_ci, stratified_mean_ci

DATA = SHARED / "data"
HAY = DATA / "long_docs" / "paradise_lost_gut.txt"
NIAH = [t for t in TASKS if t.startswith("niah")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


def policy_cache(**kw):
    """H2O over dense storage, per layer (the composed cache's three axes)."""
    return ComposedCache(policy=H2O(**kw))


def context(stories, cache) -> EvalContext:
    cache.setup(spec_of(stories[0]))
    return EvalContext(stories[0], stories[1], cache, DATA, seed=0, progress=False)


@pytest.fixture(scope="module")
def hay(stories):
    if not HAY.is_file():
        pytest.skip(f"{HAY} not found")
    return Haystacks(token_codec(stories[1], bos=1), lambda: HAY.read_text(encoding="utf-8"))


def make(task: str, hay: Haystacks, length: int, seed: int = 0, i: int = 0):
    return ALL_TASKS[task].make(ruler_eval.sample_seed(seed, task, length, i), hay, length, task)


# -- scoring and statistics (no model) ------------------------------------------------------------
@pytest.mark.parametrize("output, refs, all_of, part_of", [
    ("The special magic number is 1234567.", ["1234567"], 1.0, 1.0),           # right, with extra text
    ("7654321", ["1234567"], 0.0, 0.0),                                       # wrong
    ("they are 111 and 333", ["111", "222", "333", "444"], 0.5, 1.0),        # partial: 2 of 4
    ("VAR abcde, var FGHIJ", ["ABCDE", "fghij", "KLMNO"], 2 / 3, 1.0),       # case-insensitive
    ("", ["x"], 0.0, 0.0),
])
def test_string_match_is_rulers_definition(output, refs, all_of, part_of):
    assert string_match_all(output, refs) == pytest.approx(all_of)
    assert string_match_part(output, refs) == part_of


def test_bootstrap_intervals():
    xs = [1.0] * 30 + [0.0] * 70
    low, high = mean_ci(xs, 2000, seed=0)
    assert low < 0.3 < high and 0.18 < low and high < 0.42 and (low, high) == mean_ci(xs, 2000, seed=0)
    assert mean_ci([1.0] * 5, 100) == (1.0, 1.0) and all(math.isnan(v) for v in mean_ci([1.0], 0))
    low, high = stratified_mean_ci([[1.0] * 10, [0.0, 1.0] * 5], 500)
    assert low <= 0.75 <= high and low >= 0.5
    low, high = ratio_ci([2.0, 4.0, 6.0], [1, 2, 3], 200, transform=np.exp)  # every resample: exp(2)
    assert low == pytest.approx(math.exp(2)) and high == pytest.approx(math.exp(2))


def test_table_keys_and_averages():
    scores = {("query_aware", "a", 100): [1.0, 0.0], ("query_aware", "a", 200): [1.0, 1.0],
              ("query_aware", "b", 100): [0.0, 0.0], ("query_aware", "b", 200): [0.5, 0.5]}
    m = ruler_table(scores, 200, 0)
    assert m["a/100/acc"] == 0.5 and m["a/all/acc"] == 0.75 and m["all/200/acc"] == 0.75
    assert m["accuracy"] == pytest.approx(0.5) and m["b/100/acc/ci_low"] == m["b/100/acc/ci_high"] == 0.0
    assert all(f"{k}/ci_low" in m and f"{k}/ci_high" in m for k in m if not k.endswith(("ci_low", "ci_high")))
    both = ruler_table({**scores, **{("query_agnostic", t, n): v for (_, t, n), v in scores.items()}}, 50, 0)
    assert both["query_agnostic/a/100/acc"] == 0.5 and both["query_aware/accuracy"] == pytest.approx(0.5)
    assert "a/100/acc" not in both and both["accuracy"] == pytest.approx(0.5)


# -- generation ----------------------------------------------------------------------------------
def test_generation_is_deterministic_for_a_seed(hay):
    for task in ("niah_single_2", "niah_multikey_2", "vt", "fwe"):
        a, b = make(task, hay, 480), make(task, hay, 480)
        assert a.prompt.units == b.prompt.units and a.references == b.references
        assert make(task, hay, 480, seed=1).prompt.units != a.prompt.units


@pytest.mark.parametrize("length", [480, 1500])
def test_prompt_length_is_exact_in_tokens(hay, length):
    for task in TASKS:
        if task == "cwe" and length < 1000:
            continue
        s = make(task, hay, length)
        assert len(s.prompt.units) == length, task
        assert s.prompt.units[0] == 1 and s.prompt.units[1] != 1  # one BOS
        assert s.references and all(isinstance(r, str) and r for r in s.references)


def test_needles_are_where_the_task_says(hay, stories):
    tok = stories[1]
    for task in [*NIAH, "vt"]:
        s = make(task, hay, 1500)
        p = s.prompt
        assert len(p.needles) == len(s.needles) == len(s.depths) >= 1
        for off, sentence in zip(p.needles, s.needles, strict=True):
            ids = tok(sentence, add_special_tokens=False).input_ids
            assert p.units[off : off + len(ids)] == ids, task
            assert off + len(ids) <= len(p.context)  # in the context, before the question
        assert p.needles == sorted(p.needles) and s.depths == sorted(s.depths)  # deeper = later
        text = tok.decode(p.units)
        assert all(r in text for r in s.references)
    # depth d lands within a sentence of d x haystack: needle 0 of a single-needle task
    for i in range(5):
        s = make("niah_single_1", hay, 1500, i=i)
        off, depth = s.prompt.needles[0], s.depths[0]
        start = len(token_codec(tok, bos=1).bos) + len(tok(
            "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n", add_special_tokens=False).input_ids)
        room = len(s.prompt.context) - start - len(tok(s.needles[0], add_special_tokens=False).input_ids)
        assert abs((off - start) - depth * room) <= 30, (off, start, depth, room)


def test_multi_value_and_multi_query_references(hay, stories):
    mv, mq = make("niah_multivalue", hay, 1500), make("niah_multiquery", hay, 1500)
    assert len(mv.references) == 4 and len(set(mv.references)) == 4 and len(mq.references) == 4
    question = stories[1].decode(mq.prompt.question)
    keys = [n.split(" for ")[1].split(" is:")[0] for n in mq.needles]
    assert all(k in question for k in keys)
    hay_of_needles = stories[1].decode(make("niah_multikey_3", hay, 1500).prompt.context)
    assert hay_of_needles.count("One of the special magic uuids for") > 10


def test_word_extraction_references_are_the_most_frequent(hay, stories):
    tok = stories[1]
    cwe = make("cwe", hay, 1500)
    body = tok.decode(cwe.prompt.context).split("most often.\n", 1)[1]
    counts = {}
    for line in body.strip().split("\n")[:-1]:  # the last item may be cut
        w = line.split(". ", 1)[1].strip()
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(cwe.references) and min(counts[w] for w in top) > 3
    fwe = make("fwe", hay, 1500)
    words = tok.decode(fwe.prompt.context).split("coded words.\n", 1)[1].split()[:-1]
    freq = sorted({w: words.count(w) for w in words}.items(), key=lambda kv: -kv[1])
    assert [w for w, _ in freq[:3]] == fwe.references and freq[2][1] > freq[3][1]


def test_char_codec_for_text_prompts():
    hay = Haystacks(char_codec(), lambda: "The cat sat. The dog ran! A bird flew? " * 200)
    s = make("niah_single_2", hay, 3000)
    text = "".join(s.prompt.units)
    assert len(text) == 3000 and s.needles[0] in text and s.references[0] in text


# -- the model in the loop -----------------------------------------------------------------------
def test_protocols_agree_with_the_full_cache_and_batching_is_exact(stories, hay):
    model = stories[0]
    cache = FullCache()
    cache.setup(spec_of(model))
    samples = [make(t, hay, 470, i=i) for t in ("niah_single_1", "niah_multikey_2", "vt") for i in range(2)]
    aware = answer(model, cache, [s.prompt.units for s in samples], [[] for _ in samples], 12, [2], 64)
    agnostic = answer(model, cache, [s.prompt.context for s in samples], [s.prompt.question for s in samples],
                      12, [2], 64)
    assert aware == agnostic and all(len(a) >= 1 for a in aware)
    alone = [answer(model, cache, [s.prompt.context], [s.prompt.question], 12, [2], 64)[0] for s in samples[:3]]
    assert alone == agnostic[:3]  # right-padded rows of different context lengths: the same answers


def test_run_metrics_and_a_budget_above_the_prompt_equals_the_full_cache(stories):
    ev = Ruler(tasks=["niah_single_1", "niah_multikey_2"], lengths=[300, 470], samples=2, batch_size=2,
               protocol="both", haystack=str(HAY), max_new_tokens=8, prefill_chunk=64, bootstrap=100)
    full = ev.run(context(stories, FullCache()))
    assert full["n_samples"] == 2 * 2 * 2 * 2 and full["kv_bytes"] > 0
    for key in ("query_aware/niah_single_1/300/acc", "query_agnostic/all/470/acc", "accuracy"):
        assert 0.0 <= full[f"{key}/ci_low"] <= full[key] <= full[f"{key}/ci_high"] <= 1.0
    big = ev.run(context(stories, policy_cache(budget=10_000, when="prefill")))
    acc = lambda m: {k: v for k, v in m.items() if "acc" in k}
    assert acc(big) == acc(full) and big["evictions"] == 0
    aware = dataclasses.replace(ev, protocol="query_aware")
    small = aware.run(context(stories, policy_cache(budget=64, when="prefill")))
    assert small["evictions"] > 0 and small["tokens_held_max"] <= 64 + 8  # budget + the answer


def test_qa_is_skipped_offline_with_a_message(stories, monkeypatch, caplog):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ev = Ruler(tasks=["qa_1", "niah_single_1"], lengths=[300], samples=1, haystack=str(HAY), max_new_tokens=4)
    m = ev.run(context(stories, FullCache()))
    assert m["skipped/qa_1"] == 1.0 and "qa_1/300/acc" not in m and "niah_single_1/300/acc" in m
    assert "skipping task qa_1" in caplog.text and "hub" in caplog.text


# -- validation before weights load ----------------------------------------------------------------
def test_bad_input_is_refused_before_weights_load(tmp_path):
    from kvcompress.engine.loaders import read_config

    spec = read_config(STORIES, "stories260k").spec()  # config only
    Ruler(lengths=[256, 400]).check(spec, DATA)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['nope'\]; valid tasks: niah_single_1.*vt, cwe, fwe"):
        Ruler(tasks=["niah_single_1", "nope"]).check(spec, DATA)
    with pytest.raises(ValueError, match=r"eval.lengths must be a non-empty list of ints in \[128, max_position - "
                                         r"max_new_tokens = 416\], got \[1024\]"):
        Ruler(lengths=[1024]).check(spec, DATA)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="eval.haystack must be a non-empty text file"):
        Ruler(lengths=[256], haystack=str(empty)).check(spec, DATA)
    with pytest.raises(ValueError, match="eval.haystack must be one of wikitext2.*or a path to a text file"):
        Ruler(lengths=[256], haystack=str(tmp_path / "missing.txt")).check(spec, DATA)
    with pytest.raises(ValueError, match="eval.haystack must be a dataset with a local file"):
        Ruler(lengths=[256], haystack="hamlet").check(spec, tmp_path)
    for bad, name in ((dict(tasks="vt"), "eval.tasks"), (dict(protocol="sideways"), "eval.protocol"),
                      (dict(samples=0), "eval.samples"),
                      (dict(bootstrap=-1), "eval.bootstrap"), (dict(max_new_tokens=0), "eval.max_new_tokens")):
        with pytest.raises(ValueError, match=name):
            Ruler(**{"lengths": [256], **bad}).check(spec, DATA)


def test_kvc_eval_ruler_refuses_bad_input_before_weights_load(tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(STORIES / "config.json", folder)
    cmd = [sys.executable, "-m", "kvcompress.run", "model=local", f"model.source={folder}", "eval=ruler",
           "eval.tasks=[niah_single_1,nope]", "progress=false", f"results_dir={tmp_path}/results",
           f"hydra.run.dir={tmp_path}/run"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 1 and "valid tasks: niah_single_1" in out.stderr, out.stderr[-2000:]
    rec = json.loads(Path(tmp_path / "results" / "records.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "failed" and rec["eval"] == "ruler" and "weights" not in rec["error"]


# -- the same tasks through lm-eval (kvc_ruler_*) ---------------------------------------------------
def test_harness_tasks_are_registered_and_their_prompts_are_exact_in_characters():
    if not HAY.is_file():
        pytest.skip(f"{HAY} not found")
    from lm_eval.tasks import TaskManager

    from kvcompress.harness import TASKS_DIR

    sys.path.insert(0, str(TASKS_DIR))
    try:
        import kvc_ruler
    finally:
        sys.path.remove(str(TASKS_DIR))
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {f"kvc_ruler_{t}" for t in TASKS} | {"kvc_ruler"} <= set(tm.all_tasks)
    docs = kvc_ruler.dataset("niah_multikey_1", data_dir=str(DATA), version=1.0)["test"]
    assert len(docs) == len(kvc_ruler.RULER_CHARS) * kvc_ruler.RULER_SAMPLES
    for d in docs:
        assert len(d["context"] + d["question"]) == d["length"] and d["outputs"][0] in d["context"]
    doc = docs[0]
    assert kvc_ruler.results(doc, [f" {doc['outputs'][0]}."]) == {"acc": 1.0}
    assert kvc_ruler.results(doc, ["no idea"]) == {"acc": 0.0}


def test_qa_prompt_from_hub_rows(hay, stories, monkeypatch):
    """The QA builder on stand-in rows (the hub is not reachable in tests): gold paragraph kept whole, part-of."""
    from kvcompress.eval.ruler import qa

    paragraphs = tuple(f"Paragraph {i} tells that the colour of box {i} is shade {i * 7}." for i in range(200))
    rows = (qa.QARow("What is the colour of box 42?", ("shade 294", "294"), (paragraphs[42],)),)
    monkeypatch.setattr(qa, "load_qa", lambda source: (rows, paragraphs))
    s = make("qa_1", hay, 480)
    assert len(s.prompt.units) == 480 and s.metric == "part" and s.references == ["shade 294", "294"]
    context, question = stories[1].decode(s.prompt.context), stories[1].decode(s.prompt.question)
    assert paragraphs[42] in context and context.count("Document ") >= 3 and "box 42?" in question


def test_a_length_too_short_for_a_task_fails_before_any_decoding(stories, monkeypatch):
    called = []
    monkeypatch.setattr(ruler_eval, "answer", lambda *a, **k: called.append(1))
    ev = Ruler(tasks=["niah_single_1", "niah_multiquery"], lengths=[300], samples=1, haystack=str(HAY))
    with pytest.raises(ValueError, match="eval.lengths: 300 is too short for task niah_multiquery"):
        ev.run(context(stories, FullCache()))
    assert not called
