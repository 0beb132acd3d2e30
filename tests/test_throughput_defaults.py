"""eval=throughput with every setting at its default: it runs on a CPU and on the stories260K test model (its own
module: tests/test_throughput.py is being reworked beside it)."""
from __future__ import annotations


def test_throughput_defaults_run_on_cpu_and_stories(stories):
    from kvcompress.cache import FullCache
    from kvcompress.eval.base import EvalContext
    from kvcompress.eval.data import default_data_dir
    from kvcompress.eval.throughput import Throughput

    model, tok = stories
    cache = FullCache()
    cache.setup(model.config.spec())
    ev = Throughput(dataset="tinystories", repeats=1)  # every other setting: the default
    ev.check(model.config.spec(), default_data_dir())
    m = ev.run(EvalContext(model, tok, cache, default_data_dir(), progress=False))
    spec = model.config.spec()
    assert m["context"] == min(1024, spec.max_position - ev.decode_tokens)
    assert m["kv_budget_auto"] == 1 and m["batch_size"] >= 1 and m["decode_tokens_per_s"] > 0
    assert m["kv_budget_bytes"] == ev.auto_rows * spec.fp16_bytes_per_token() * (m["context"] + ev.decode_tokens - 1)
