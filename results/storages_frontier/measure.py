"""Issue 25's measurement: perplexity with the cache in the loop for every frontier storage against int4, KIVI-2/4,
KVQuant-3/4 and GEAR at about 8, 4, 3 and 2 bits per entry, on SmolLM2-135M, one process (the model loads once,
one calibration text for every storage that calibrates).

    .venv/bin/python results/storages_frontier/measure.py   # appends rows.jsonl; then kvc-report --table

Each row: a conf/storage YAML with overrides, built like test_axes builds an axis (Hydra instantiate), in a
ComposedCache (no policy, per-layer), calibrated on ``CAL_TOKENS`` TinyStories tokens (windows of 512), then
``eval.ppl.window_nll`` (the function behind ``eval=ppl``) over each text's windows, chunk ``CHUNK``. Bytes: the
cache's ``kv_bytes`` at the end of a window (codes, scales, residuals, positions), per stored entry
(layers x 2 x Hkv x head_dim x tokens). Environment: WIKI (windows x tokens, default 2x128), LONG (paradise_lost,
default 1x256), CHUNK (64), CAL_TOKENS (1024), ONLY (a regex of row names), RECORDS
(the output file), MODEL (a model name, default smollm2-135m; each record names it).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from kvcompress.cache import ComposedCache  # noqa: E402
from kvcompress.engine.loaders import load, resolve_source  # noqa: E402
from kvcompress.eval.calibration import Calibration  # noqa: E402
from kvcompress.eval.data import load_text  # noqa: E402
from kvcompress.eval.ppl import text_windows, window_nll  # noqa: E402
from kvcompress.eval.stats import ratio_ci  # noqa: E402

# name: (target bits per entry, storage YAML, overrides)
ROWS = {
    "full (fp32)": (32, "dense", {}),
    "fp8 e4m3 per-token": (8, "fp8", {}),
    "fp8 e4m3 per-tensor (calibrated)": (8, "fp8", {"scale": "tensor"}),
    "int4 g64": (4, "int4", {}),
    "int4 g32": (4, "int4", {"group_size": 32}),
    "KIVI-4 g32 r32": (4, "kivi", {"bits": 4, "residual": 32}),
    "KVQuant-4 1%": (4, "kvquant", {"bits": 4}),
    "NVFP4": (4, "fp4", {"format": "nvfp4"}),
    "MXFP4": (4, "fp4", {"format": "mxfp4"}),
    "Hadamard + int4 g32": (4, "rotated", {}),
    "KVQuant-3 1%": (3, "kvquant", {"bits": 3}),
    "Hadamard + int4 K / int2 V g32": (3, "rotated", {"value_bits": 2}),
    "PQ 3-bit (sub 2/4)": (3, "pq", {"key_sub": 2, "value_sub": 4}),
    "KIVI-2 g32 r32": (2, "kivi", {"bits": 2, "residual": 32}),
    "GEAR 2-bit": (2, "gear", {}),
    "int2 g32": (2, "int2", {"group_size": 32}),
    "Hadamard + int2 g32": (2, "rotated", {"key_bits": 2, "value_bits": 2}),
    # rotation x KIVI: the same KIVI settings over Hadamard-rotated K and V; then both with pre-RoPE keys
    "Hadamard + KIVI-4 g32 r32": (4, "rotated_kivi", {"bits": 4, "residual": 32}),
    "Hadamard + KIVI-2 g32 r32": (2, "rotated_kivi", {"bits": 2, "residual": 32}),
    "KIVI-2 g32 r32 pre-RoPE": (2, "kivi", {"bits": 2, "residual": 32, "keys": "pre_rope"}),
    "Hadamard + KIVI-2 g32 r32 pre-RoPE": (2, "rotated_kivi", {"bits": 2, "residual": 32, "keys": "pre_rope"}),
    "PQ 2-bit (sub 4/4)": (2, "pq", {"key_sub": 4, "value_sub": 4}),
    # KVTC with every token coded (no sinks, no hot window), like the scalar rows above; blocks of 64 tokens
    "KVTC 4-bit": (4, "kvtc", {"bits": 4.0, "residual": 0, "sink": 0}),
    "KVTC 3-bit": (3, "kvtc", {"bits": 3.0, "residual": 0, "sink": 0}),
    "KVTC 2-bit": (2, "kvtc", {"bits": 2.0, "residual": 0, "sink": 0}),
    # KVTC's 4 attention sinks kept fp16 (the paper's setting without its 128-token hot window): the first token's
    # outsized keys and values are clamped by steps fitted to typical tokens. Blocks of 60 tokens: a 64-token chunk
    # less the sinks fills whole blocks (blocks of 64 would leave 60 tokens fp16 until the next chunk)
    "KVTC 3-bit + 4 sinks": (3, "kvtc", {"bits": 3.0, "residual": 0, "sink": 4, "block_size": 60}),
    "KVTC 2-bit + 4 sinks": (2, "kvtc", {"bits": 2.0, "residual": 0, "sink": 4, "block_size": 60}),
}


def sizes(env: str, default: str) -> tuple[int, int]:
    n, w = os.environ.get(env, default).split("x")
    return int(n), int(w)


def storage(name: str, overrides: dict):
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf/storage" / f"{name}.yaml"), overrides)
    return instantiate(cfg, _convert_="all")


def main() -> None:
    torch.manual_seed(0)
    chunk, cal_tokens = int(os.environ.get("CHUNK", 64)), int(os.environ.get("CAL_TOKENS", 1024))
    only = re.compile(os.environ.get("ONLY", ".*"))
    data = ROOT.parent / "shared" / "data"
    model_name = os.environ.get("MODEL", "smollm2-135m")
    model, tok = load(resolve_source(model_name), model_name)
    spec = model.config.spec()
    texts = {}
    for dataset, env, default in (("wikitext2", "WIKI", "2x128"), ("paradise_lost", "LONG", "1x256")):
        n, w = sizes(env, default)
        texts[dataset] = text_windows(tok, load_text(dataset, data), w, n)
    ctx = Calibration(model, tok, data, "tinystories", cal_tokens, 512,
                      Path(os.environ.get("KVC_CALIBRATION_DIR", "~/.cache/kvcompress/calibration")).expanduser(),
                      progress=False)
    out = Path(os.environ.get("RECORDS", Path(__file__).with_name("rows.jsonl")))
    for name, (bits, yaml, overrides) in ROWS.items():
        if not only.search(name):
            continue
        cache = ComposedCache(storage(yaml, overrides))
        cache.setup(spec)
        t0 = time.time()
        cache.calibrate(ctx)
        for dataset, windows in texts.items():
            per_window: list[float] = []
            with torch.inference_mode():
                total, n, memory = window_nll(model, windows, cache, chunk, per_window=per_window)
            tokens = windows.shape[1]
            entries = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * tokens * windows.shape[0]
            counts = [tokens - 1] * windows.shape[0]
            lo, hi = ratio_ci(per_window, counts, transform=np.exp)  # nan for a single window
            rec = {"row": name, "model": model_name, "target_bits": bits, "storage": yaml, "settings": overrides,
                   "dataset": dataset,
                   "windows": windows.shape[0], "window": tokens, "chunk": chunk, "calibration_tokens": cal_tokens,
                   "ppl": math.exp(total / n), "ppl_ci": [float(lo), float(hi)],
                   "bits_per_entry": 8 * memory["kv_bytes"] / entries, **memory,
                   "seconds": round(time.time() - t0, 1)}
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{name:36s} {dataset:14s} ppl {rec['ppl']:.3f} bits/entry {rec['bits_per_entry']:.2f} "
                  f"({rec['seconds']}s)", flush=True)
            t0 = time.time()


if __name__ == "__main__":
    main()
