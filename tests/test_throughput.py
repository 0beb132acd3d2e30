"""eval=throughput: the batch search (pure arithmetic, then measured on stories260K) and a complete record.
No time assertions: only that tokens/s is measured and positive."""
from __future__ import annotations

import pytest
import torch

from kvcompress.cache import ComposedCache, FullCache
from kvcompress.cache.storage.quant.store import QuantizedStore
from kvcompress.eval.base import EvalContext
from kvcompress.eval.data import default_data_dir
from kvcompress.eval.speed import Speed, spread
from kvcompress.eval.throughput import Throughput, fit_batch, free_device_bytes, shrink

KEYS = ("batch_size", "batch_limit", "kv_budget_bytes", "kv_budget_auto", "bytes_per_row", "kv_budget_used",
        "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "noisy",
        "decode_tokens_per_s_per_row", "decode_path", "kv_bytes", "kv_bytes_fp16", "compression_ratio")


def run(stories, cache, **kw):
    model, tok = stories
    cache.setup(model.config.spec())
    ev = Throughput(**{"context": 24, "decode_tokens": 3, "repeats": 1, "prefill_chunk": None,
                       "dataset": "tinystories", **kw})
    ev.check(model.config.spec(), default_data_dir())
    return ev.run(EvalContext(model, tok, cache, default_data_dir(), progress=False))


def test_fit_and_shrink():
    assert fit_batch(100.0, 1050, 64) == 10
    assert fit_batch(100.0, 1050, 4) == 4  # capped
    assert fit_batch(100.0, 99, 64) == 0
    assert shrink(10, held=1200, budget=1000) == 8
    assert shrink(10, held=1001, budget=1000) == 9  # always smaller


def test_batch_is_the_largest_that_fits(stories):
    probe = run(stories, FullCache(), kv_budget_bytes=10**9, max_batch=2)  # per-row bytes of the full cache
    per_row = probe["bytes_per_row"]
    assert probe["batch_size"] == 2 and probe["batch_limit"] == "max_batch"
    budget = int(per_row * 5.5)
    m = run(stories, FullCache(), kv_budget_bytes=budget)
    assert m["batch_size"] == 5 and m["batch_limit"] == "kv_budget"
    assert m["kv_bytes"] <= budget < m["kv_bytes"] + per_row  # fits, and one more row would not
    assert m["kv_bytes"] == 5 * per_row and m["kv_budget_used"] == m["kv_bytes"] / budget
    for key in KEYS:
        assert key in m, key
    assert m["decode_path"] == "eager" and m["noisy"] in (0, 1)
    assert m["decode_tokens_per_s_min"] <= m["decode_tokens_per_s"] <= m["decode_tokens_per_s_max"]
    assert m["decode_tokens_per_s"] > 0


def test_a_compressed_cache_fits_more_rows(stories):
    full = run(stories, FullCache(), kv_budget_bytes=200_000)
    int4 = run(stories, ComposedCache(QuantizedStore(bits=4, group_size=8)), kv_budget_bytes=200_000)
    assert int4["bytes_per_row"] < full["bytes_per_row"]
    assert int4["batch_size"] > full["batch_size"] >= 1
    assert int4["kv_bytes"] <= 200_000


def test_budget_can_count_allocated_bytes(stories):
    m = run(stories, ComposedCache(QuantizedStore(bits=4, group_size=8)), kv_budget_bytes=200_000,
            budget_counts="allocated")
    assert m["kv_bytes_allocated"] <= 200_000 and m["batch_size"] >= 1


def test_budget_below_one_row_names_the_setting(stories):
    with pytest.raises(ValueError, match="eval.kv_budget_bytes"):
        run(stories, FullCache(), kv_budget_bytes=10)


@pytest.mark.parametrize("kw, setting", [
    (dict(kv_budget_bytes=0), "eval.kv_budget_bytes"),
    (dict(kv_budget_bytes="lots"), "eval.kv_budget_bytes"),
    (dict(kv_budget_bytes=True), "eval.kv_budget_bytes"),
    (dict(auto_fraction=1.5), "eval.auto_fraction"),
    (dict(probe_batch=0), "eval.probe_batch"),
    (dict(budget_counts="bytes"), "eval.budget_counts"),
    (dict(context=10**7), "eval.context"),
])
def test_bad_settings_name_the_setting(stories, kw, setting):
    ev = Throughput(**{"dataset": "tinystories", "context": 64, **kw})
    with pytest.raises(ValueError, match=setting):
        ev.check(stories[0].config.spec(), default_data_dir())


def test_auto_budget_needs_cuda():
    with pytest.raises(ValueError, match="auto needs a CUDA device"):
        free_device_bytes(torch.device("cpu"), 0.5)


def test_spread_flags_passes_that_disagree(capsys):
    calm = spread("decode_tokens_per_s", [10.0, 10.5, 11.0])
    assert calm == {"decode_tokens_per_s": 10.5, "decode_tokens_per_s_min": 10.0, "decode_tokens_per_s_max": 11.0,
                    "noisy": 0}
    assert capsys.readouterr().err == ""
    assert spread("decode_tokens_per_s", [5.0, 10.0, 11.0])["noisy"] == 1  # (11 - 5) / 10 > 20%
    assert "decode_tokens_per_s is noisy" in capsys.readouterr().err


def test_speed_records_the_spread_and_the_decode_path(stories):
    model, tok = stories
    cache = FullCache()
    cache.setup(model.config.spec())
    m = Speed(context=32, decode_tokens=4, repeats=2, dataset="tinystories").run(
        EvalContext(model, tok, cache, default_data_dir(), progress=False))
    assert m["decode_tokens_per_s_min"] <= m["decode_tokens_per_s"] <= m["decode_tokens_per_s_max"]
    assert m["noisy"] in (0, 1) and m["decode_path"] == "eager"


def test_the_static_path_fits_its_reserved_capacity(stories):
    """decode_path=graph measures the static form: its bytes are the whole capacity it reserves, and the batch
    still fits the budget (on CPU the static step runs eagerly: path ``static``)."""
    kivi = lambda: ComposedCache(QuantizedStore(bits=2, group_size=4, key_axis="channel", residual=8))
    eager = run(stories, kivi(), kv_budget_bytes=200_000)
    static = run(stories, kivi(), kv_budget_bytes=200_000, decode_path="graph")
    assert static["decode_path"] == "static" and eager["decode_path"] == "eager"
    assert static["kv_bytes"] <= 200_000 and static["batch_size"] >= 1
    assert static["bytes_per_row"] >= eager["bytes_per_row"]  # capacity reserved up front, residual slots included
