"""lm-eval harness: parity with lm-eval's hf model, rolling ppl == eval=ppl, local tasks end to end, errors."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED, STORIES
from lm_eval.api.instance import Instance

import kvcompress.harness as harness
from kvcompress.eval.base import EvalContext
from kvcompress.eval.data import tokenize
from kvcompress.eval.harness import LmEval, flatten
from kvcompress.eval.ppl import Perplexity
from kvcompress.harness.model import HarnessLM as KVCompressLM

pytestmark = pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} not found")
STORY_TEXT = SHARED / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.first100.txt"


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lm() -> KVCompressLM:  # odd chunk and batch sizes so chunk and batch boundaries fall mid-request
    return KVCompressLM(model="stories260k", device="cpu", batch_size=3, chunk=13, rolling="lm_eval")


def test_loglikelihoods_equal_lm_evals_hf_model(lm):
    from lm_eval.api.registry import get_model

    hf = get_model("hf").create_from_arg_string(f"pretrained={STORIES},dtype=float32",
                                                {"device": "cpu", "batch_size": 2})
    story = STORY_TEXT.read_text()[200:1700]  # ~600 tokens: longer than max_length 512, so left-truncated
    pairs = [("Once upon a time, there was a", " little girl"), ("Lily liked to ", "play with her ball."),
             ("", "Hello there"), ("Tom and Sam went to the park. The dog", " barked"), (story, " The end."),
             ("Tom and Sam went to the park. The dog", " ran")]
    ours, ref = lm.loglikelihood(requests("loglikelihood", pairs)), hf.loglikelihood(requests("loglikelihood", pairs))
    for (a, ga), (b, gb) in zip(ours, ref, strict=True):
        assert abs(a - b) < 1e-3 and ga == gb
    assert len({round(a, 4) for a, _ in ours}) == len(pairs)  # distinct requests, distinct answers
    text = requests("loglikelihood_rolling", [(STORY_TEXT.read_text()[:1500],)])  # two 512-token windows
    assert abs(lm.loglikelihood_rolling(text)[0] - hf.loglikelihood_rolling(text)[0]) < 1e-3


def test_generate_until_honours_stop_strings_and_max_tokens(lm):
    reqs = requests("generate_until", [("Once upon a time", {"until": ["."], "max_gen_toks": 40}),
                                       ("Lily and Tom", {"until": ["\n"], "max_gen_toks": 3}),
                                       ("Once upon a time", {"until": [","], "max_gen_toks": 40})])
    full, short, comma = lm.generate_until(reqs)
    assert full and "." not in full and comma == ""  # the greedy text starts with ","; cut at the stop string
    assert len(lm.tok_encode(short, add_special_tokens=False)) <= 3
    assert lm.generate_until(reqs[:1]) == [full]  # batching does not change greedy output


def story_with_tokens(tokenizer, n: int) -> Path:
    """A text whose tokenization has exactly ``n`` tokens (so eval=ppl drops no tail)."""
    text = STORY_TEXT.read_text()
    lo, hi = 0, len(text)
    while lo < hi:  # smallest prefix with >= n tokens, then walk to an exact one
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(tokenize(tokenizer, text[:mid])) < n else (lo, mid)
    for cut in range(lo, lo + 200):
        if len(tokenize(tokenizer, text[:cut])) == n:
            return text[:cut]
    raise AssertionError("no exact cut")


@pytest.mark.parametrize("cache_args", [{}, {"policy": "h2o", "policy.budget": 40, "policy.recent": 8}])
def test_rolling_word_perplexity_equals_eval_ppl(tmp_path, cache_args):
    """One document, windows of 128 (BOS + 127 tokens), chunk 16, batch 2: the same as eval=ppl with max_windows
    null on that text, also with a compressed cache in the loop."""
    lm = KVCompressLM(model="stories260k", device="cpu", window=128, chunk=16, batch_size=2, rolling="ppl",
                      **cache_args)
    text = story_with_tokens(lm.tokenizer, 4 * 127)
    path = tmp_path / "doc.txt"
    path.write_text(text)
    ppl = Perplexity(dataset=str(path), window=128, max_windows=None, chunk=16, batch_size=2)
    ctx = EvalContext(lm.model, lm.tokenizer, lm.cache, tmp_path, progress=False)
    m = ppl.run(ctx)
    ll = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))[0]
    assert m["n_windows"] == 4 and m["n_tokens"] == 4 * 127
    assert -ll == pytest.approx(m["nll"] * m["n_tokens"], rel=1e-6)
    words = len(text.split())
    assert math.exp(-ll / words) == pytest.approx(math.exp(m["nll"] * m["n_tokens"] / words), rel=1e-5)


def test_local_tasks_end_to_end_through_simple_evaluate():
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(harness.TASKS_DIR), include_defaults=False)
    assert set(harness.LOCAL_TASKS) <= set(tm.all_tasks)
    args = "model=stories260k,policy=streaming,policy.budget=64,chunk=64,batch_size=4"
    out = simple_evaluate(model="kvcompress", model_args=args,
                          tasks=list(harness.LOCAL_TASKS), limit=1, task_manager=tm, device="cpu", bootstrap_iters=0)
    m = flatten(out["results"])
    assert 1 < m["kvc_wikitext2/word_perplexity"] < math.inf and m["kvc_wikitext2/bits_per_byte"] > 0
    assert 0 <= m["kvc_tinystories_cloze/acc"] <= 1 and 0 <= m["kvc_passkey/acc"] <= 1
    assert out["config"]["kvcompress_cache"] == "streaming"


def test_kvc_eval_lm_eval_records_task_metrics(tmp_path):
    cmd = [sys.executable, "-m", "kvcompress.run", "model=stories260k", "eval=lm_eval",
           "eval.limit={kvc_tinystories_cloze:1}", "eval.chunk=64", "eval.tasks=[kvc_tinystories_cloze]",
           "storage=kivi", "storage.group_size=8", "progress=false",
           f"results_dir={tmp_path}/results", f"hydra.run.dir={tmp_path}/run"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "results" / "records.jsonl").read_text().splitlines()[0])
    assert rec["status"] == "ok" and rec["eval"] == "lm_eval" and rec["cache"] == "kivi"
    m = rec["metrics"]
    assert 0 <= m["kvc_tinystories_cloze/acc"] <= 1 and 0 <= m["kvc_tinystories_cloze/acc_norm"] <= 1
    assert m["kvc_tinystories_cloze/n_samples"] == 1 and m["kv_bytes"] > 0


def test_unknown_task_is_a_clear_error(tmp_path):
    from kvcompress.engine.loaders import read_config

    spec = read_config(STORIES, "stories260k").spec()
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['kvc_nope'\].*kvc_wikitext2"):
        LmEval(tasks=["kvc_nope"]).check(spec, tmp_path)
    with pytest.raises(ValueError, match="eval.window"):
        LmEval(window=4096).check(spec, tmp_path)
    with pytest.raises(ValueError, match="eval.limit must be keys among eval.tasks"):
        LmEval(tasks=["kvc_wikitext2"], limit={"kvc_passkey": 2}).check(spec, tmp_path)


@pytest.mark.parametrize("args, message", [
    ({"policy": "nope"}, r"(?s)policy/nope.*h2o"),                 # unknown method: the choices are listed
    ({"nonsense": 1}, r"nonsense"),                                # unknown key
    ({"policy": "h2o", "policy.nonsense": 1}, r"policy.nonsense"),  # unknown option of a method
    ({"storage": "int8", "storage.bits": 3}, r"storage=int8: storage.bits"),  # the storage's own check
    ({"rolling": "sliding"}, r"rolling must be ppl \| lm_eval"),
    ({"window": 4096}, r"window must be in \[2, max_length=512\]"),
])
def test_unknown_or_bad_model_args_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        KVCompressLM(model="stories260k", device="cpu", **args)


def test_kvc_lm_eval_cli_takes_batch_size_in_model_args(tmp_path):
    from kvcompress.harness import __main__ as cli

    assert "cache=" not in cli.__doc__  # the example composes the axes
    code = ("import sys; from kvcompress.harness.__main__ import main; main(sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, "--model", "kvcompress", "--model_args",
                          "model=stories260k,batch_size=2", "--tasks", "kvc_tinystories_cloze", "--limit", "2",
                          "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kvc_tinystories_cloze" in out.stdout and "TypeError" not in out.stderr
