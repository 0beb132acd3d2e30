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
#   6. table    $OUT/table.md from the records: kvc-report --table with results/cpu_bench/table.yaml, headed by
#               the device, settings and commit this script writes to $OUT/bench.jsonl
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
# into $OUT/transfer/records.jsonl; `kvc-report --table $OUT/transfer --spec results/transfer/table.yaml` tables it.
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
  phase kernels 40 $PY scripts/bench_kernels.py --out "$OUT"
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

# the table: results/cpu_bench/table.yaml over the records, with the header's facts in bench.jsonl (one line)
ENGINE_MD=$(cd "$OUT" && ls engine/*.md 2>/dev/null | sort | head -n 1 || true)
DEVICE="$GPU" SETTINGS="${MODEL[*]}" COMMIT=$(git rev-parse --short HEAD 2>/dev/null || true) ENGINE_MD="$ENGINE_MD" $PY -c '
import json, os
print(json.dumps({"device": os.environ["DEVICE"], "model": os.environ["SETTINGS"], "commit": os.environ["COMMIT"],
                  "engine": os.environ["ENGINE_MD"] or None}))' > "$OUT/bench.jsonl"
.venv/bin/kvc-report --table "$OUT" --spec results/cpu_bench/table.yaml && cat "$OUT/table.md"
echo "bench_gpu: done in $(( $(date +%s) - T0 ))s -> $OUT/table.md"
