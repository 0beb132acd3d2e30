#!/usr/bin/env bash
# Issue 25's table: every frontier storage against int4, KIVI-2/4, KVQuant-3/4 and GEAR, cache in the loop
# (measure.py: sizes and settings in its docstring), the rows split over single-threaded processes (one model load
# each; the calibrating rows share one calibration text per process); records are appended to rows.jsonl (the
# table keeps the latest of each model, row and text), then the table and plot:
#   bash results/storages_frontier/run.sh [MODEL [ROWS]] && .venv/bin/kvc-report --table results/storages_frontier
# MODEL: smollm2-135m (default: every row), qwen2.5-0.5b (a subset: the CPU runs it ~4x slower) or qwen2.5-1.5b (a
# subset in one process); ROWS: a regex of row names run in one process instead of the model's groups.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
MODEL=${1:-smollm2-135m}
case $MODEL in
  smollm2-135m)
    GROUPS_=('full|fp8 e4m3 per-token|^int4|^KIVI-4|MXFP4|^int2'  # no calibration (int4: g64 and g32)
             'KIVI-2|GEAR|Hadamard'                             # no calibration (rotation x KIVI too)
             'per-tensor|NVFP4|KVQuant-4'                       # calibrated scales, KVQuant codebooks
             'KVQuant-3|PQ'                                     # k-means codebooks
             'KVTC') ;;                                         # PCA bases
  qwen2.5-0.5b)
    GROUPS_=('^full|fp8 e4m3 per-token|^int4 g32|KIVI-4|NVFP4|KVQuant-3|^Hadamard \+ int4 g32'
             'KVQuant-4|Hadamard \+ int4 K|GEAR|Hadamard \+ int2|KIVI-2'
             'KVTC') ;;
  qwen2.5-1.5b)  # a subset at ~8, 4, 3 and 2 bits, one process
    GROUPS_=('^full|fp8 e4m3 per-token|^int4 g32|KIVI|NVFP4|KVQuant-3|^Hadamard \+ int[42] g32|PQ 2-bit|^KVTC [32]-bit$') ;;
  *) echo "unknown MODEL $MODEL (smollm2-135m | qwen2.5-0.5b | qwen2.5-1.5b)" >&2; exit 2 ;;
esac
[ $# -ge 2 ] && GROUPS_=("$2")
pids=()
for i in "${!GROUPS_[@]}"; do
  MODEL=$MODEL OMP_NUM_THREADS=1 ONLY="${GROUPS_[$i]}" RECORDS=results/storages_frontier/rows.$i.jsonl \
    $PY results/storages_frontier/measure.py &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
cat results/storages_frontier/rows.[0-9].jsonl >> results/storages_frontier/rows.jsonl
rm results/storages_frontier/rows.[0-9].jsonl
