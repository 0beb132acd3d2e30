"""Evaluations: batching doesn't change perplexity; settings are validated before weights load."""
import math

import pytest

from kvcompress.cache import FullCache
from kvcompress.eval.base import EvalContext
from kvcompress.eval.data import default_data_dir, load_text
from kvcompress.eval.ppl import Perplexity, text_windows, window_nll
from kvcompress.eval.speed import Speed

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: a tiny model is fastest on one thread


def ctx(stories, cache=None):
    model, tok = stories
    cache = cache or FullCache()
    cache.setup(model.config.spec())
    return EvalContext(model, tok, cache, default_data_dir(), progress=False)


def test_batched_windows_equal_one_at_a_time(stories):
    c = ctx(stories)
    batched = Perplexity("tinystories", window=128, max_windows=6, chunk=32, batch_size=6).run(c)
    single = Perplexity("tinystories", window=128, max_windows=6, chunk=32, batch_size=1).run(c)
    assert batched["n_tokens"] == single["n_tokens"] == 6 * 127
    assert math.isclose(batched["ppl"], single["ppl"], rel_tol=1e-5)


def test_chunk_one_equals_full_prefill_for_full_cache(stories):
    c = ctx(stories)
    a = Perplexity("tinystories", window=96, max_windows=2, chunk=1).run(c)
    b = Perplexity("tinystories", window=96, max_windows=2, chunk=96).run(c)
    assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-5)


def test_bootstrap_zero_records_no_interval(stories):
    """eval.bootstrap=0 means no interval: the value alone (no NaN bounds, which would fail the run)."""
    c = ctx(stories)
    plain = Perplexity("tinystories", window=64, max_windows=2, chunk=64, bootstrap=0).run(c)
    with_ci = Perplexity("tinystories", window=64, max_windows=2, chunk=64).run(c)
    assert "ppl/ci_low" not in plain and "ppl/ci_high" not in plain and plain["ppl"] == with_ci["ppl"]
    assert with_ci["ppl/ci_low"] <= with_ci["ppl"] <= with_ci["ppl/ci_high"]


def test_ppl_is_the_mean_nll_of_the_windows(stories):
    """Independent recomputation with one plain forward pass per window."""
    model, tok = stories
    windows = text_windows(tok, load_text("tinystories", default_data_dir()), 64, 3)
    assert (windows[:, 0] == tok.bos_token_id).all()  # stories260K wants BOS
    c = ctx(stories)
    got = Perplexity("tinystories", window=64, max_windows=3, chunk=8).run(c)
    nll = 0.0
    for w in windows:
        cache = FullCache()
        cache.setup(model.config.spec())
        s, n, _ = window_nll(model, w[None], cache, chunk=64)
        nll += s
    assert math.isclose(got["nll"], nll / (3 * 63), rel_tol=1e-6)


def test_speed_reports_throughput_latency_and_ppl(stories):
    m = Speed(context=64, batch_size=2, decode_tokens=8, dataset="tinystories").run(ctx(stories))
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_latency_ms_p50", "decode_latency_ms_p90"):
        assert m[key] > 0
    assert m["decode_latency_ms_p90"] >= m["decode_latency_ms_p50"]
    assert m["n_tokens"] == 16 and math.isfinite(m["ppl"])
    assert m["kv_bytes_fp16"] == stories[0].config.spec().fp16_bytes_per_token() * 2 * (64 + 7)


@pytest.mark.parametrize("kwargs, setting", [
    (dict(chunk=0), "eval.chunk"),
    (dict(window=10_000), "eval.window"),
    (dict(batch_size=0), "eval.batch_size"),
    (dict(dataset="nope"), "unknown dataset 'nope'; valid choices: wikitext2"),
])
def test_bad_ppl_settings_name_the_setting(stories, kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        Perplexity(**{"window": 256, **kwargs}).check(stories[0].config.spec(), default_data_dir())


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_text("hamlet", tmp_path)


def test_fidelity_of_the_full_cache_is_perfect(stories):
    from kvcompress.eval.fidelity import Fidelity

    m = Fidelity("tinystories", window=64, max_windows=2, chunk=16).run(ctx(stories))
    assert m["kl"] == pytest.approx(0, abs=1e-6) and m["top1_agreement"] == 1.0
    assert m["ppl"] == pytest.approx(m["ppl_full"], rel=1e-6) and m["n_tokens"] == 2 * 63


def test_fidelity_measures_a_lossy_cache_against_full(stories):
    from kvcompress.cache import ComposedCache
    from kvcompress.cache.policy.streaming import StreamingLLM
    from kvcompress.eval.fidelity import Fidelity

    streaming = lambda: ComposedCache(policy=StreamingLLM(budget=16, sinks=2))
    settings = dict(dataset="tinystories", window=96, max_windows=2, chunk=8)
    lossy = Fidelity(**settings).run(ctx(stories, streaming()))
    assert lossy["kl"] > 1e-3 and lossy["top1_agreement"] < 1.0 and lossy["evictions"] > 0
    plain = Perplexity(**settings).run(ctx(stories, streaming()))
    full = Perplexity(**settings).run(ctx(stories))
    assert lossy["ppl"] == pytest.approx(plain["ppl"], rel=1e-5)
    assert lossy["ppl_full"] == pytest.approx(full["ppl"], rel=1e-5)
