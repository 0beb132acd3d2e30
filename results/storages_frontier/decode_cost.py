"""Decode cost per step of the storages that decode on read (KVTC inflates its DEFLATE streams at every step)
against the full cache and int4: SmolLM2-135M, one row holding ``CONTEXT`` tokens of wikitext2 (prefilled in chunks
of 256), then the best of ``REPEATS`` single-token decode steps (the whole model forward; CPU, one thread) and the
part of it spent reading the cache (every layer's ``read``). Writes decode_cost.jsonl; table.yaml reports it.

    OMP_NUM_THREADS=1 .venv/bin/python results/storages_frontier/decode_cost.py

Environment: CONTEXT (1024), REPEATS (5), ONLY (a regex of measure.py row names).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
from measure import ROOT, ROWS, storage

from kvcompress.cache import ComposedCache
from kvcompress.engine.generate import forward_chunks
from kvcompress.engine.loaders import load, resolve_source
from kvcompress.eval.calibration import Calibration
from kvcompress.eval.data import load_text
from kvcompress.eval.ppl import text_windows

DEFAULT = r"^full|^int4 g32|^KVTC 3-bit$|^Hadamard \+ int4 g32"


@torch.inference_mode()
def main() -> None:
    context, repeats = int(os.environ.get("CONTEXT", 1024)), int(os.environ.get("REPEATS", 5))
    only = re.compile(os.environ.get("ONLY", DEFAULT))
    data = ROOT.parent / "shared" / "data"
    model, tok = load(resolve_source("smollm2-135m"), "smollm2-135m")
    toks = text_windows(tok, load_text("wikitext2", data), context + repeats, 1)
    ctx = Calibration(model, tok, data, "tinystories", 1024, 512,
                      Path(os.environ.get("KVC_CALIBRATION_DIR", "~/.cache/kvcompress/calibration")).expanduser(),
                      progress=False)
    out = Path(__file__).with_name("decode_cost.jsonl")
    for name, (_, yaml, overrides) in ROWS.items():
        if not only.search(name):
            continue
        cache = ComposedCache(storage(yaml, overrides))
        cache.setup(model.config.spec())
        cache.calibrate(ctx)
        cache.reset(1)
        forward_chunks(model, toks[:, :context], cache, 256)
        stores, read_s, step_s = cache.stores(), [], []
        for t in range(context, context + repeats):
            t0 = time.perf_counter()
            for s in stores:
                s.read()
            read_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model(toks[:, t:t + 1], torch.tensor([[t]]), cache)
            step_s.append(time.perf_counter() - t0)
        rec = {"row": name, "context": context, "repeats": repeats, "step_ms": 1e3 * min(step_s),
               "read_ms": 1e3 * min(read_s), "kv_bytes": cache.kv_bytes()}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{name:36s} step {rec['step_ms']:.1f} ms, reading the cache {rec['read_ms']:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
