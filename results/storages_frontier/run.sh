#!/usr/bin/env bash
# Issue 25's table: every frontier storage against int4, KIVI-2/4, KVQuant-3/4 and GEAR on SmolLM2-135M, cache in
# the loop (measure.py: sizes and settings in its docstring), the rows split over four single-threaded processes
# (one model load each; the calibrating rows share one calibration text per process), then the table and plot:
#   bash results/storages_frontier/run.sh && .venv/bin/python results/storages_frontier/table.py
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
GROUPS_=('full|fp8 e4m3 per-token|^int4|KIVI-4|MXFP4|^int2'  # no calibration (int4: g64 and g32)
         'KIVI-2|GEAR|Hadamard'                             # no calibration
         'per-tensor|NVFP4|KVQuant-4'                       # calibrated scales, KVQuant codebooks
         'KVQuant-3|PQ')                                    # k-means codebooks
pids=()
for i in "${!GROUPS_[@]}"; do
  OMP_NUM_THREADS=1 ONLY="${GROUPS_[$i]}" RECORDS=results/storages_frontier/rows.$i.jsonl \
    $PY results/storages_frontier/measure.py &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
cat results/storages_frontier/rows.[0-9].jsonl > results/storages_frontier/rows.jsonl
rm results/storages_frontier/rows.[0-9].jsonl
