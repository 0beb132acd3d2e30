#!/usr/bin/env bash
# One-command GPU benchmark for issue 14 (about 8 minutes on one H100/H200, 10 if every phase hits its cap:
# each phase has its own time limit, so a slow one is cut short, its finished records kept, the cut in phases.txt):
#   1. setup    KVC_TORCH=torch bash scripts/setup.sh (a CUDA torch; SKIP_SETUP=1 skips it)
#   2. tests    the compiled Triton kernels and the CUDA-graph decode step against their references;
#      kernels  one layer's decode attention: full-precision SDPA vs packed int8/int4/KIVI-2/latent/FP8/FP4 by the
#               Triton kernel and by the reference (dequantize, then SDPA), ms and GB/s (kernels.{json,md})
#   3. speed    kvc eval=speed: decode tok/s of full / int8 / int4 / KIVI-2 / latent 0.5 / H2O 25%
#               (latent absorbed, keys pre-RoPE (reconstructed, rotated) and post-RoPE (read as latents only))
#               at contexts 1k, 4k, 8k (8176: SmolLM2's 8192 positions minus the decoded tokens), batch 1 and 16,
#               on the eager path and on the graph path (eval.decode_path=graph: the cache's static-capacity form,
#               one decode step captured as a CUDA graph and replayed)
#   4. throughput  kvc eval=throughput at one KV budget (KV_BUDGET bytes, default 2 GB, context 4k):
#               full / int4 / KIVI-2 on both paths, the batch each fits and its decode tok/s
#   5. engine   scripts/bench_engine.py on CUDA: engine (eager and captured static step) vs transformers,
#               with the fraction of the memory roofline (PEAK_GBPS, guessed from the GPU's name)
#   6. table    $OUT/table.md from the records, headed by the device's name, torch and commit
# Records: $OUT/records.jsonl (kvc), engine/ (bench_engine), logs/ (each phase), phases.txt.
# Needs the text data of ../shared/data (or KVC_DATA_DIR) and network for setup (torch, the model).
# BENCH_CPU=1: the same matrix on this machine's CPU (SmolLM2, fp32, context 1k, batch 1 and 8, 50 MB budget,
# the engine bench without CUDA graphs) into results/cpu_bench: the CPU figures beside the GPU ones.
# TABLE_ONLY=1 (with the same mode variables): rebuild $OUT/table.md from the records already there, no runs.
# ONLY=REGEX: run only the phases whose name matches (e.g. ONLY='throughput|engine' SKIP_SETUP=1 for a second call
# when a device call's time limit cut the first; records and phases.txt accumulate in $OUT).
# CPU_CHECK=1: the same kvc commands at toy sizes on stories260K on the CPU (no setup, no CUDA, no engine
# bench), into /tmp/kvc_gpu_bench_check: checks that every command composes before a GPU is spent on it.
# TRANSFER=1 (issue 23; long: about an hour or more on one H100, so a call of its own): the phases transfer_*
# only: the transfer study's wide grid (conf/experiment/transfer.yaml's 14 caches, and the six policies at 50% too,
# on SmolLM2-135M, Qwen2.5-0.5B and Qwen2.5-1.5B: eval=prefill_decode with 4 pieces of 4,096 + 256 tokens of Hamlet
# and Paradise Lost scored token by token, eval=ruler on six needle tasks at 1k/2k/4k, 8 prompts each) and
# Qwen2.5-1.5B's speed matrix (the caches of phase 3 at contexts 1k, 4k, 16k, batch 1 and 16, eager and graph),
# into $OUT/transfer/records.jsonl; results/transfer/table.py reads that file as it reads its own.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${CPU_CHECK:-}" ]; then
  OUT=${OUT:-/tmp/kvc_gpu_bench_check}
  SKIP_SETUP=1
  KV_BUDGET=${KV_BUDGET:-400000}
  MODEL=(model=stories260k device=cpu dtype=float32)
  CONTEXTS=64,128 BATCHES=1,2 TPUT_CONTEXT=64 DATA=tinystories SCALE=10  # a shared CPU: longer limits
  TR_MODELS=(stories260k) TR_CONTEXTS=64,128 TR_TEXT=(eval.context=96 eval.continuation=16 eval.samples=2
    eval.dataset=tinystories) TR_RULER=("eval.lengths=[448]" eval.samples=2 eval.max_new_tokens=16
    "eval.tasks=[niah_single_1]")
elif [ -n "${BENCH_CPU:-}" ]; then
  OUT=${OUT:-results/cpu_bench}
  SKIP_SETUP=1
  KV_BUDGET=${KV_BUDGET:-50000000}
  MODEL=(model=smollm2-135m device=cpu dtype=float32)
  CONTEXTS=1024 BATCHES=1,8 TPUT_CONTEXT=1024 DATA=wikitext2 SCALE=10  # 2 cores: generous limits
else
  MODEL=(model=smollm2-135m device=cuda dtype=bfloat16)
  CONTEXTS=1024,4096,8176 BATCHES=1,16 TPUT_CONTEXT=4096 DATA=wikitext2 SCALE=1
  TR_MODELS=(smollm2-135m qwen2.5-0.5b qwen2.5-1.5b) TR_CONTEXTS=1024,4096,16384
  TR_TEXT=(eval.context=4096 eval.continuation=256 eval.samples=4 eval.continuation_chunk=1
    eval.dataset=hamlet,paradise_lost) TR_RULER=("eval.lengths=[1024,2048,4096]" eval.samples=8 eval.batch_size=8
    eval.chat=true
    "eval.tasks=[niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multivalue]")
fi
OUT=${OUT:-results/gpu_bench}
KV_BUDGET=${KV_BUDGET:-2000000000}
mkdir -p "$OUT/logs"
T0=$(date +%s)
[ -n "${TABLE_ONLY:-}${ONLY:-}" ] || : > "$OUT/phases.txt"  # ONLY: the calls accumulate

phase() {  # phase NAME SECONDS CMD...: run with a time limit, log its output, note rc and duration
  [ -z "${TABLE_ONLY:-}" ] || return 0
  [[ -z "${ONLY:-}" || $1 =~ ${ONLY} ]] || return 0
  if [[ $1 == transfer_* ]]; then [ -n "${TRANSFER:-}" ] || return 0  # TRANSFER=1: the transfer phases only
  else [ -z "${TRANSFER:-}" ] || return 0; fi
  local name=$1 limit=$(( $2 * SCALE )) t=$(date +%s); shift 2
  echo "== $name (limit ${limit}s, at $(( t - T0 ))s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$(( $(date +%s) - t ))s" | tee -a "$OUT/phases.txt"
  tail -n 3 "$OUT/logs/$name.log"
}

if [ -z "${SKIP_SETUP:-}" ] && [ -z "${TRANSFER:-}" ]; then
  phase setup 150 env KVC_TORCH=torch bash scripts/setup.sh
fi
PY=.venv/bin/python
if [ -n "${CPU_CHECK:-}" ]; then
  GPU="CPU check (no GPU figures)" PEAK=""
elif [ -n "${BENCH_CPU:-}" ]; then
  GPU="CPU: $($PY -c "import platform, torch; print(platform.processor() or 'cpu', torch.get_num_threads(), 'threads')")"
  PEAK=""
elif [ -z "${TABLE_ONLY:-}" ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench_gpu: no CUDA device visible to $PY (torch $($PY -c 'import torch; print(torch.__version__)'))" >&2
  exit 1
else
  GPU=${GPU_NAME:-$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")}
  case "$GPU" in
    *H200*) PEAK=${PEAK_GBPS:-4800} ;;
    *H100*PCIe*) PEAK=${PEAK_GBPS:-2000} ;;
    *H100*) PEAK=${PEAK_GBPS:-3350} ;;
    *A100*) PEAK=${PEAK_GBPS:-2039} ;;
    *) PEAK=${PEAK_GBPS:-} ;;
  esac
  echo "bench_gpu: $GPU (peak ${PEAK:-unknown} GB/s)"
  phase tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_fp.py \
    tests/test_static.py tests/test_latent_captured.py tests/test_static_evict.py -k "cuda or triton or graph or static"
  phase kernels 40 $PY -m kvcompress.kernels.bench --out "$OUT"
fi

KVC=(.venv/bin/kvc -m "${MODEL[@]}" results_dir="$OUT" progress=false)
SPEED=(eval=speed eval.context=$CONTEXTS eval.batch_size=$BATCHES eval.decode_tokens=16 eval.repeats=2
       eval.prefill_chunk=2048 eval.dataset=$DATA)
for path in eager graph; do
  phase speed_${path}_dense_int 90 "${KVC[@]}" "${SPEED[@]}" eval.decode_path=$path storage=dense,int8,int4
  phase speed_${path}_latent 60 "${KVC[@]}" "${SPEED[@]}" eval.decode_path=$path storage=latent \
    storage.rank_fraction=0.5 storage.keys=pre_rope,post_rope storage.absorb=true
  phase speed_${path}_kivi2 35 "${KVC[@]}" "${SPEED[@]}" eval.decode_path=$path storage=kivi storage.bits=2
  phase speed_${path}_h2o 45 "${KVC[@]}" "${SPEED[@]}" eval.decode_path=$path policy=h2o policy.budget=0.25
done
TPUT=(eval=throughput eval.context=$TPUT_CONTEXT eval.kv_budget_bytes="$KV_BUDGET" eval.decode_tokens=16
      eval.repeats=2 eval.dataset=$DATA eval.decode_path=eager,graph)
phase throughput 60 "${KVC[@]}" "${TPUT[@]}" storage=dense,int4
phase throughput_kivi2 40 "${KVC[@]}" "${TPUT[@]}" storage=kivi storage.bits=2
if [ -n "${TRANSFER:-}" ] && [ -z "${BENCH_CPU:-}" ]; then  # issue 23: the wide transfer grid, 1.5B speed matrix
  DEV=("${MODEL[@]:1}")  # the mode's device and dtype
  TR=(.venv/bin/kvc -m experiment=transfer "${DEV[@]}" results_dir="$OUT/transfer" progress=false)
  POLICIES_50=(+experiment/point=full policy=streaming,snapkv,h2o,expected_attention,kvzip,adakv policy.budget=0.5
               policy.when=prefill)
  for m in "${TR_MODELS[@]}"; do
    phase transfer_text_$m 1200 "${TR[@]}" model=$m eval=prefill_decode "${TR_TEXT[@]}"
    phase transfer_text50_$m 600 "${TR[@]}" model=$m eval=prefill_decode "${TR_TEXT[@]}" "${POLICIES_50[@]}"
    phase transfer_ruler_$m 1200 "${TR[@]}" model=$m eval=ruler "${TR_RULER[@]}"
  done
  TR_SPEED=(eval=speed eval.context=$TR_CONTEXTS eval.batch_size=$BATCHES eval.decode_tokens=16 eval.repeats=2
            eval.prefill_chunk=2048 eval.dataset=$DATA model=${TR_MODELS[-1]} +experiment/point=full)
  for path in eager graph; do
    phase transfer_speed_$path 600 "${TR[@]}" "${TR_SPEED[@]}" eval.decode_path=$path \
      storage=dense,int8,int4 policy=none
    phase transfer_speed_${path}_kivi2_latent_h2o 600 bash -c '"$@" storage=kivi storage.bits=2 && \
      "$@" storage=latent storage.rank_fraction=0.5 storage.absorb=true && "$@" policy=h2o policy.budget=0.25' \
      _ "${TR[@]}" "${TR_SPEED[@]}" eval.decode_path=$path
  done
fi
if [ -z "${CPU_CHECK:-}${TRANSFER:-}" ]; then
  if [ -n "${BENCH_CPU:-}" ]; then ENGINE=(--device cpu --dtype float32 --batch 1 8 --repeats 3)
  else ENGINE=(--device cuda --dtype bfloat16 --batch 1 16 ${PEAK:+--peak-gbps "$PEAK"}); fi
  phase engine 45 $PY scripts/bench_engine.py "${ENGINE[@]}" --static --out "$OUT/engine"
fi

GPU="$GPU" PEAK="$PEAK" OUT="$OUT" MODEL="${MODEL[*]}" $PY - <<'PYEOF'
import json, os, subprocess
from pathlib import Path

out = Path(os.environ["OUT"])
recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines() if x.strip()] \
    if (out / "records.jsonl").is_file() else []
ok = [r for r in recs if r.get("status") == "ok"]
path = lambda r: (r.get("metrics") or {}).get("decode_path") or r.get("eval_params", {}).get("decode_path") or "eager"
name = lambda r: (r["cache"] + (f" {r['storage_params'].get('bits')}-bit" if r.get("storage") == "kivi" else "")
                  + (f" {r['storage_params'].get('keys')}" if r.get("storage") == "latent" else "")
                  + ("" if path(r) == "eager" else f" [{path(r)}]"))
UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
size = lambda b: next(f"{b / u:.3g} {n}" for u, n in UNITS if b >= u or u == 1)
sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
versions = ", ".join(sorted({str(r.get("code_version")) for r in recs}))
lines = [f"# Benchmark: {os.environ['GPU']}", "",
         f"`bash scripts/bench_gpu.sh` (table written at commit {sha}; records' code version: {versions}); "
         f"{os.environ['MODEL']}; records in `records.jsonl`, engine bench in `engine/`, phase log in `phases.txt`.",
         "", "## Decode tokens/s (eval=speed)", "",
         "vs full: against the full cache at the same context, batch and path; vs eager: the same cache's eager path; "
         "ppl vs eager: the relative difference of the teacher-forced perplexity over the decoded tokens from the "
         "eager path's (0 up to fp noise; a quantized code can round the other way on that noise).",
         "", "| cache | context | batch | decode tok/s | vs full | vs eager | ppl vs eager | min..max | noisy | kv MB "
         "| path |", "|---|---|---|---|---|---|---|---|---|---|---|"]
speed = [r for r in ok if r["eval"] == "speed"]
cell = lambda r: (r["eval_params"]["context"], r["eval_params"].get("batch_size"))
ident = lambda r: (r["cache"], json.dumps(r.get("storage_params"), sort_keys=True), cell(r))
rate = {(r["cache"], r.get("storage_params", {}).get("bits"), cell(r), path(r)): r["metrics"]["decode_tokens_per_s"]
        for r in ok if r["eval"] in ("speed", "throughput")}
eager_ppl = {ident(r): r["metrics"]["ppl"] for r in speed if path(r) == "eager"}
dppl = lambda r: f"{r['metrics']['ppl'] / eager_ppl[ident(r)] - 1:+.1e}" if path(r) != "eager" and ident(r) in \
    eager_ppl else ""
ratio = lambda x, key: f"{x / rate[key]:.2f}x" if key in rate else ""
for r in sorted(speed, key=lambda r: (r["eval_params"]["context"], r["eval_params"]["batch_size"], name(r))):
    m, c, b = r["metrics"], r["eval_params"]["context"], r["eval_params"]["batch_size"]
    x, bits = m["decode_tokens_per_s"], r.get("storage_params", {}).get("bits")
    rel, own = ratio(x, ("full", None, cell(r), path(r))), ratio(x, (r["cache"], bits, cell(r), "eager"))
    lines.append(f"| {name(r)} | {c} | {b} | {x:.1f} | {rel} | {own if path(r) != 'eager' else ''} | {dppl(r)} | "
                 f"{m.get('decode_tokens_per_s_min', 0):.1f}..{m.get('decode_tokens_per_s_max', 0):.1f} | "
                 f"{m.get('noisy', '')} | {m['kv_bytes'] / 1e6:.1f} | {path(r)} |")
tput = [r for r in ok if r["eval"] == "throughput"]
if tput:
    lines += ["", f"## Throughput at a KV budget (eval=throughput)", "",
              "| cache | budget | context | batch | bytes/row | decode tok/s | vs full (same path) |",
              "|---|---|---|---|---|---|---|"]
    for r in sorted(tput, key=lambda r: (path(r), name(r))):
        m = r["metrics"]
        rel = ratio(m["decode_tokens_per_s"], ("full", None, cell(r), path(r)))
        lines.append(f"| {name(r)} | {size(m['kv_budget_bytes'])} | {r['eval_params']['context']} | "
                     f"{m['batch_size']} | {size(m['bytes_per_row'])} | {m['decode_tokens_per_s']:.1f} | {rel} |")
failed = [r for r in recs if r.get("status") != "ok"]
if failed:
    where = lambda p: f"context {p.get('context')}" + (f" batch {p['batch_size']}" if "batch_size" in p else "")
    lines += ["", "## Failed runs", ""] + [f"- {name(r)} {r['eval']} {where(r.get('eval_params') or {})}: "
                                          f"{r.get('error')}" for r in failed]
if (out / "kernels.md").is_file():
    lines += ["", "## Decode attention per layer (python -m kvcompress.kernels.bench)", "",
              (out / "kernels.md").read_text()]
engine = sorted((out / "engine").glob("*.md"))
if engine:
    lines += ["", "## Engine vs transformers (scripts/bench_engine.py)", "", engine[0].read_text()]
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
echo "bench_gpu: done in $(( $(date +%s) - T0 ))s -> $OUT/table.md"
