"""Where a compiled CPU decode step spends its time (issue 29), and the masked decode attention's two CPU routes.

    .venv/bin/python scripts/profile_cpu_step.py --dtype bfloat16                 # the full cache's compiled step
    .venv/bin/python scripts/profile_cpu_step.py --storage kivi                   # KIVI-2's (conf/storage/kivi.yaml)
    .venv/bin/python scripts/profile_cpu_step.py --attention-only --dtype bfloat16

SmolLM2-135M, batch 1, ``--context`` tokens prefilled into the cache's static form, the step compiled by Inductor
(``engine/compiled.py``) with its per-kernel profile on (``cpp.enable_kernel_profile``), then ``--steps`` steps under
the torch profiler: the kernels by self time. ``--attention-only`` times one layer's masked decode attention over
``--context`` keys (SmolLM2's 9 query / 3 KV heads, head_dim 64): upcast to fp32 (the route ``cache/base.SLOW_CPU_HALF``
takes on a CPU without oneDNN's half kernels) against the native half-precision SDPA, eager, microseconds a call.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kvcompress.cache.base import visibility_mask
from kvcompress.engine.loaders import DTYPES


def attention_routes(dtype: torch.dtype, context: int, calls: int = 200) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 3, context, 64, generator=g).to(dtype) for _ in range(2))
    q_pos, k_pos = torch.tensor([[context - 1]]), torch.arange(context)[None]
    mask = visibility_mask(q_pos, k_pos)
    routes = {"upcast to fp32": lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                       attn_mask=mask, enable_gqa=True).to(dtype),
              f"native {dtype}": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)}
    for name, fn in routes.items():
        for _ in range(5):
            fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        print(f"{name:>22}: {(time.perf_counter() - t0) / calls * 1e6:7.1f} us a call ({context} keys)")


@torch.inference_mode()
def profile_step(dtype: torch.dtype, storage: str, context: int, steps: int) -> None:
    from kvcompress.cache.composed import ComposedCache
    from kvcompress.cache.storage.quant.store import QuantizedStore
    from kvcompress.engine import compiled
    from kvcompress.engine.generate import positions_like
    from kvcompress.engine.loaders import ensure_asset, load

    model, _ = load(ensure_asset("smollm2-135m", "~/.cache/kvcompress/models"), "smollm2-135m", torch.device("cpu"),
                    dtype)
    kivi = QuantizedStore(bits=2, group_size=32, key_axis="channel", value_axis="token", residual=128)
    composed = ComposedCache(storage=kivi if storage == "kivi" else None)
    composed.setup(model.config.spec())
    cache = composed.static_form(context + steps + 1)
    cache.setup(model.config.spec())
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))

    def prefill():
        cache.reset(1)
        model(ids, positions_like(ids), cache, select=torch.full((1,), context - 1))

    prefill()
    step = compiled.CompiledDecode(model, cache, 1, {**compiled.COMPILE_OPTIONS, "cpp.enable_kernel_profile": True})
    print(f"compiled: {step.compiled} ({step.reason or f'{step.compile_s:.0f} s'})")
    nxt = torch.zeros((1, 1), dtype=torch.long)
    for run in ("warm-up", "profiled"):
        prefill()
        pos = torch.full((1, 1), context)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(nxt, pos)
                pos = pos + 1
            took = time.perf_counter() - t0
        print(f"{steps / took:.1f} tok/s under the profiler ({run})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--storage", default="dense", choices=["dense", "kivi"])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attention-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention_only:
        attention_routes(DTYPES[args.dtype], args.context + 65)  # the compiled step's capacity: context + decode + 1
    else:
        profile_step(DTYPES[args.dtype], args.storage, args.context, args.steps)


if __name__ == "__main__":
    main()
