"""Engine vs transformers on the same model, process and dtype: prefill and decode throughput.

    .venv/bin/python scripts/bench_engine.py                      # CPU, fp32, SmolLM2-135M, 1k context
    .venv/bin/python scripts/bench_engine.py --device cuda --dtype bfloat16 --static --peak-gbps 4800
    .venv/bin/python scripts/bench_engine.py --batch 1 --decode 64 --compiled --no-hf   # CPU: the compiled step

Each row is the best of ``--repeats`` interleaved runs (engine, transformers, engine, ...), so
background load hits both alike. ``--static`` adds the engine's captured decode step (a static-capacity
cache, ``kvcompress.engine.static``: a CUDA graph on CUDA, the same step eager elsewhere) as ``engine_static``.
``--compiled`` adds that static step compiled by Inductor (``kvcompress.engine.compiled``) as
``engine_compiled``, with its compile seconds (``compile_s``: once per shape; a later run reloads it from disk).
``--no-hf`` leaves transformers out (ratios are then absent). ``--peak-gbps`` (the GPU's memory bandwidth) adds
the fraction of the memory roofline each decode row reaches: a step moves at least
the weights plus the KV cache held (``bytes / step time / peak``).
Writes results/engine_bench/<device>-<dtype>.{json,md} (``--out`` elsewhere), with the GPU's name.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import torch

from kvcompress.cache import FullCache
from kvcompress.cache.storage.dense import StaticKVCache
from kvcompress.engine.compiled import CompiledDecode
from kvcompress.engine.generate import positions_like
from kvcompress.engine.loaders import DTYPES, ensure_asset, load
from kvcompress.engine.static import CapturedDecode


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run_engine(model, tokens, decode):
    cache = FullCache()
    cache.setup(model.config.spec())
    cache.reset(tokens.shape[0])
    B, C = tokens.shape
    sync(tokens.device)
    t0 = time.perf_counter()
    logits = model(tokens, positions_like(tokens), cache, select=torch.full((B,), C - 1, device=tokens.device))
    sync(tokens.device)
    t1 = time.perf_counter()
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    for i in range(decode):
        nxt = model(nxt, torch.full((B, 1), C + i, device=tokens.device), cache)[:, -1].argmax(-1, keepdim=True)
    sync(tokens.device)
    return t1 - t0, time.perf_counter() - t1


COMPILED: dict[tuple[int, int], tuple[StaticKVCache, CompiledDecode]] = {}  # (batch, capacity) -> cache, step


def static_cache(model, batch: int, capacity: int, compiled: bool):
    """A static cache and its decode step; a compiled step (compiled once per batch and capacity) stays bound to its
    cache, so both are kept and reused, while the captured step is recorded afresh each run (not timed)."""
    if compiled and (batch, capacity) in COMPILED:
        cache, step = COMPILED[(batch, capacity)]
        cache.reset(batch)
        return cache, step
    cache = StaticKVCache(capacity, dtype=model.dtype, device=model.device)
    cache.setup(model.config.spec())
    cache.reset(batch)
    if compiled:
        COMPILED[(batch, capacity)] = cache, CompiledDecode(model, cache, batch)
        return COMPILED[(batch, capacity)]
    return cache, None


@torch.inference_mode()
def run_static(model, tokens, decode, capacity: int | None = None, compiled: bool = False):
    """Prefill eager into a static-capacity cache, capture (or compile) the decode step, not timed, then run it."""
    B, C = tokens.shape
    cache, step = static_cache(model, B, capacity or C + decode + 1, compiled)
    sync(tokens.device)
    t0 = time.perf_counter()
    logits = model(tokens, positions_like(tokens), cache, select=torch.full((B,), C - 1, device=tokens.device))
    sync(tokens.device)
    prefill_s = time.perf_counter() - t0
    step = step or CapturedDecode(model, cache, B)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.full((B, 1), C, device=tokens.device)
    sync(tokens.device)
    t1 = time.perf_counter()
    for _ in range(decode):
        nxt = step(nxt, pos)[:, -1].argmax(-1, keepdim=True)
        pos = pos + 1
    sync(tokens.device)
    return prefill_s, time.perf_counter() - t1


def step_bytes(model, batch: int, context: int, decode: int) -> int:
    """A decode step's memory floor: every weight once + the KV cache held at mid-decode (model dtype)."""
    weights = sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())
    per_token = model.config.spec().fp16_bytes_per_token() // 2 * model.dtype.itemsize
    return weights + per_token * batch * (context + decode // 2)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


@torch.inference_mode()
def run_hf(hf, tokens, decode):
    from transformers import DynamicCache

    cache = DynamicCache()
    sync(tokens.device)
    t0 = time.perf_counter()
    out = hf(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(tokens.device)
    t1 = time.perf_counter()
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(decode):
        out = hf(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    sync(tokens.device)
    return t1 - t0, time.perf_counter() - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a preset (conf/model/)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/engine_bench")
    ap.add_argument("--static", action="store_true", help="also time the captured static decode step")
    ap.add_argument("--compiled", action="store_true", help="also time that step compiled by Inductor")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth, for the roofline fraction")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gguf = ensure_asset(args.model, "~/.cache/kvcompress/models")
    model, tok = load(gguf, args.model, device, dtype)
    text_path = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/wiki.test.raw"
    n_ids = args.context * max(args.batch)
    if text_path.is_file():
        ids = torch.tensor(tok(text_path.read_text()[:200_000]).input_ids[:n_ids], device=device)
    else:  # speed does not depend on the text: random tokens where the shared data is absent
        ids = torch.randint(0, model.config.vocab_size, (n_ids,), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
    ids = ids.repeat(-(-n_ids // ids.numel()))[:n_ids]
    capacity = args.context + args.decode + 1  # the compiled step's one shape: its warm-up compiles it
    runners = [("engine", run_engine, model)]
    runners += [("engine_static", run_static, model)] if args.static else []
    if args.compiled:
        runners.append(("engine_compiled", partial(run_static, capacity=capacity, compiled=True), model))
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).to(device).eval()
        runners.append(("transformers", run_hf, hf))
    rows = []
    for B in args.batch:
        tokens = ids[: B * args.context].view(B, args.context)
        for _, fn, m in runners:
            fn(m, tokens[:, :64], 4)  # warm-up (compiles the compiled step)
        best = {name: [float("inf")] * 2 for name, _, _ in runners}
        for _ in range(args.repeats):
            for name, fn, m in runners:
                p, d = fn(m, tokens, args.decode)
                best[name] = [min(best[name][0], p), min(best[name][1], d)]
        for phase, i, n in (("prefill", 0, B * args.context), ("decode", 1, B * args.decode)):
            rows.append(bench_row(phase, B, args, {name: n / best[name][i] for name in best}, model))
            print(rows[-1], flush=True)
    meta = {"model": args.model, "device": str(device), "device_name": device_name(device), "dtype": args.dtype,
            "torch": torch.__version__, "cpu": platform.processor(), "threads": torch.get_num_threads(),
            "decode_tokens": args.decode, "repeats": args.repeats, "peak_gbps": args.peak_gbps,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if args.compiled:
        step = COMPILED[(max(args.batch), capacity)][1]
        meta |= {"compiled": step.compiled, "compiled_reason": step.reason,
                 "compile_s": {f"batch {b}": round(COMPILED[(b, capacity)][1].compile_s, 1) for b in args.batch}}
    write(Path(args.out), f"{device.type}-{args.dtype}", meta, rows)


def bench_row(phase: str, B: int, args, rate: dict[str, float], model) -> dict:
    """One phase's row: tok/s of each runner (``<name>_tok_s``) and the ratios to transformers where it ran."""
    row = {"phase": phase, "batch": B, "context": args.context}
    row |= {f"{name}_tok_s": round(r, 1) for name, r in rate.items()}
    h = rate.get("transformers")
    if h:
        row["ratio"] = round(rate["engine"] / h, 3)
        row |= {f"{name[len('engine_'):]}_ratio": round(rate[name] / h, 3) for name in rate if "_" in name
                and name.startswith("engine_")}
    if phase == "decode" and args.peak_gbps:
        floor = step_bytes(model, B, args.context, args.decode)
        fastest = max(r for name, r in rate.items() if name.startswith("engine"))
        row["roofline_fraction"] = round(floor * fastest / B / (args.peak_gbps * 1e9), 4)
    return row


def write(out: Path, stem: str, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    names = {"engine_tok_s": "engine tok/s", "engine_static_tok_s": "engine static tok/s",
             "engine_compiled_tok_s": "engine compiled tok/s", "transformers_tok_s": "transformers tok/s",
             "ratio": "engine / transformers", "static_ratio": "static / transformers",
             "compiled_ratio": "compiled / transformers", "roofline_fraction": "roofline fraction"}
    cols = [("phase", "phase"), ("batch", "batch"), ("context", "context")]
    cols += [(k, h) for k, h in names.items() if any(k in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    (out / f"{stem}.md").write_text(f"`python scripts/bench_engine.py {shlex.join(sys.argv[1:])}` "
                                    f"({meta})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def _cell(key: str, v) -> str:
    if v is None:
        return ""
    if key == "roofline_fraction":
        return f"{v:.1%}"
    return f"{v:.2f}x" if "ratio" in key else str(v)


if __name__ == "__main__":
    main()
