"""Engine vs transformers on the same model, process and dtype: prefill and decode throughput.

    .venv/bin/python scripts/bench_engine.py                      # CPU, fp32, SmolLM2-135M, 1k context
    .venv/bin/python scripts/bench_engine.py --device cuda --dtype bfloat16

Each row is the best of ``--repeats`` interleaved runs (engine, transformers, engine, ...), so
background load hits both alike. Writes results/engine_bench/<device>-<dtype>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from kvcompress.cache import FullCache
from kvcompress.engine.generate import positions_like
from kvcompress.engine.loaders import DTYPES, ensure_asset, load


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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/engine_bench")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gguf = ensure_asset("smollm2-135m", "~/.cache/kvcompress/models")
    model, tok = load(gguf, "smollm2-135m", device, dtype)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).to(device).eval()
    text = (Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/wiki.test.raw").read_text()[:200_000]
    ids = torch.tensor(tok(text).input_ids[: args.context * max(args.batch)], device=device)
    rows = []
    for B in args.batch:
        tokens = ids[: B * args.context].view(B, args.context)
        run_engine(model, tokens[:, :64], 4), run_hf(hf, tokens[:, :64], 4)  # warm-up
        best = {"engine": [float("inf")] * 2, "transformers": [float("inf")] * 2}
        for _ in range(args.repeats):
            for name, fn, m in (("engine", run_engine, model), ("transformers", run_hf, hf)):
                p, d = fn(m, tokens, args.decode)
                best[name] = [min(best[name][0], p), min(best[name][1], d)]
        for phase, i, n in (("prefill", 0, B * args.context), ("decode", 1, B * args.decode)):
            e, h = n / best["engine"][i], n / best["transformers"][i]
            rows.append({"phase": phase, "batch": B, "context": args.context, "engine_tok_s": round(e, 1),
                         "transformers_tok_s": round(h, 1), "ratio": round(e / h, 3)})
            print(rows[-1], flush=True)
    meta = {"device": str(device), "dtype": args.dtype, "torch": torch.__version__, "cpu": platform.processor(),
            "threads": torch.get_num_threads(), "decode_tokens": args.decode, "repeats": args.repeats}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{device.type}-{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| phase | batch | context | engine tok/s | transformers tok/s | engine / transformers |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['batch']} | {r['context']} | {r['engine_tok_s']} | {r['transformers_tok_s']} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    (out / f"{stem}.md").write_text(f"`python scripts/bench_engine.py {shlex.join(sys.argv[1:])}` "
                                    f"({meta})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
