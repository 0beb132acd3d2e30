"""Our logits against transformers' fp32 logits on the same tokens, for each embedded model; one record per model.

    .venv/bin/python scripts/check_models.py [qwen2.5-0.5b qwen2.5-1.5b gemma3-270m]   (default: all three)
    .venv/bin/python scripts/check_models.py --table    (only regenerate results/models/README.md from the records)

Each model's file is fetched if needed (engine/assets.py). The same TOKENS tokens of WikiText-2 (for Gemma 3 more
than its 512-token window, so its sliding layers trim and mask) go through, each phase in its own process so that
only one copy of the weights is in memory at a time and each peak RSS is that phase's alone:
  * transformers: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=..., dtype=float32)``, one forward;
  * ours, first load (any fp32 copy removed: dequantises the GGUF and writes the copy beside it), alone;
  * ours, a later load (reads that copy), then one shot, and chunked prefill (chunks of CHUNK) followed by DECODE
    single-token steps, both with the full cache; the logits of each against transformers'.
Writes results/models/<model>.json: max abs differences, load times, peak RSS of each process, and the versions.
"""
from __future__ import annotations

import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kvcompress.engine.assets import ASSETS, MODELS_DIR, ensure_asset  # noqa: E402

MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "gemma3-270m")
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
# tokens per model: past Gemma 3's 512-token window (its sliding layers trim and mask); fewer on the larger Qwens
TOKENS, CHUNK, DECODE = {"qwen2.5-0.5b": 384, "qwen2.5-1.5b": 256, "gemma3-270m": 640}, 64, 16
OUT = REPO / "results" / "models"
PHASES = ("transformers", "ours_first_load", "ours")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_transformers(gguf: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        logits = hf(tokens).logits
    return logits, {"load_s": load_s}


def run_ours(gguf: Path, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    from kvcompress.cache import FullCache
    from kvcompress.engine.generate import forward_chunks, positions_like
    from kvcompress.engine.loaders import load, read_config

    def fresh(model):
        cache = FullCache()
        cache.setup(model.config.spec())
        cache.reset(tokens.shape[0])
        return cache

    t0 = time.perf_counter()
    config = read_config(gguf, "check")
    model, _ = load(gguf, "check")
    second_s = time.perf_counter() - t0
    out = {}
    with torch.inference_mode():
        out["one_shot"] = model(tokens, positions_like(tokens), fresh(model))
        cache, prompt = fresh(model), tokens.shape[1] - DECODE
        steps = [forward_chunks(model, tokens[:, :prompt], cache, chunk=CHUNK)]
        for t in range(prompt, tokens.shape[1]):
            steps.append(model(tokens[:, t : t + 1], positions_like(tokens[:, t : t + 1], t), cache))
        out[f"prefill_chunks_{CHUNK}_then_decode_{DECODE}"] = torch.cat(steps, 1)
        report = cache.memory_report()
    return out, {"load_s": second_s, "arch": config.arch,
                 "layer_windows": sorted({str(w) for w in config.layer_windows or [None]}),
                 "kv_bytes_fp16": report["kv_bytes_fp16"],
                 "kv_bytes_fp16_no_window": report.get("kv_bytes_fp16_no_window", report["kv_bytes_fp16"])}


def first_load(gguf: Path) -> dict:
    from kvcompress.engine.loaders import _converted_dir, load

    shutil.rmtree(_converted_dir(gguf), ignore_errors=True)
    t0 = time.perf_counter()
    load(gguf, "check")  # dequantises the GGUF one tensor at a time, then writes the fp32 copy
    return {"load_s": time.perf_counter() - t0}


def phase(which: str, gguf: Path, work: Path) -> None:
    tokens = torch.load(work / "tokens.pt")
    torch.set_num_threads(2)
    if which == "ours_first_load":
        stats = first_load(gguf)
    elif which == "transformers":
        logits, stats = run_transformers(gguf, tokens)
        torch.save(logits, work / "hf.pt")
    else:
        logits, stats = run_ours(gguf, tokens)
        torch.save(logits, work / "ours.pt")
    stats["peak_rss_gib"] = peak_rss_gib()
    (work / f"{which}.json").write_text(json.dumps(stats))


def check(name: str) -> dict:
    import tempfile

    import transformers

    from kvcompress.engine.loaders import load_tokenizer

    gguf = ensure_asset(name, MODELS_DIR)
    tokenizer = load_tokenizer(gguf)
    ids = tokenizer(TEXT.read_text()[:20000])["input_ids"][: TOKENS[name]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(torch.tensor([ids]), work / "tokens.pt")
        for which in PHASES:
            print(f"[check_models] {name}: {which} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--phase", which, str(gguf), str(work)], check=True)
        ref, ours = torch.load(work / "hf.pt"), torch.load(work / "ours.pt")
        stats = {w: json.loads((work / f"{w}.json").read_text()) for w in PHASES}
    asset = ASSETS[name]
    return {
        "model": name, "file": asset.file, "sha256": asset.sha256, "bytes": asset.size, "licence": asset.licence,
        "packages": [p for p, _ in asset.parts], "tokens": len(ids), "text": "wikitext-2 wiki.test.raw (start)",
        "max_abs_diff": {k: float((v - ref).abs().max()) for k, v in ours.items()},
        "logit_scale": float(ref.abs().max()),
        "top1_agreement": {k: float((v.argmax(-1) == ref.argmax(-1)).float().mean()) for k, v in ours.items()},
        **stats,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "command": f"python scripts/check_models.py {name}",
    }


def table() -> str:
    """The records in results/models/ as a Markdown table (also pasted into README.md's Models section)."""
    rows = ["| model | file (sha256) | tokens | max abs logit diff: one shot / chunked + decode | logit scale | "
            "top-1 agreement | load s: transformers / ours first / ours later | peak RSS GiB: transformers / ours "
            "first load / ours later load + forwards |", "|" + "---|" * 8]
    for f in sorted(OUT.glob("*.json")):
        r = json.loads(f.read_text())
        diffs = " / ".join(f"{v:.2e}" for v in r["max_abs_diff"].values())
        top1 = " / ".join(f"{v:.4f}" for v in r["top1_agreement"].values())
        load_s = " / ".join(f"{r[p]['load_s']:.1f}" for p in PHASES)
        rss = " / ".join(f"{r[p]['peak_rss_gib']:.2f}" for p in PHASES)
        rows.append(f"| {r['model']} | {r['file']} ({r['sha256'][:12]}…) | {r['tokens']} | {diffs} | "
                    f"{r['logit_scale']:.1f} | {top1} | {load_s} | {rss} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--phase"]:
        phase(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    names = [] if sys.argv[1:] == ["--table"] else sys.argv[1:] or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {', '.join(unknown)}; valid choices: {', '.join(MODELS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        record = check(name)
        (OUT / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({k: record[k] for k in ("model", "max_abs_diff", "top1_agreement")}), flush=True)
    (OUT / "README.md").write_text(
        "# Embedded models against transformers\n\nFrom `python scripts/check_models.py` (each model's record: "
        "`<model>.json`; this table is regenerated from them). fp32 on the 2-core CPU, shared with other jobs: "
        "load times are wall-clock and vary with the load.\n\n" + table())


if __name__ == "__main__":
    main()
