#!/usr/bin/env bash
# Issue 25's table: every frontier storage against int4, KIVI-2/4, KVQuant-3/4 and GEAR on SmolLM2-135M, cache in
# the loop (measure.py: sizes and settings in its docstring), in two processes (the rows split; one model load and
# one calibration each), then the table and plot:
#   bash results/storages_frontier/run.sh && .venv/bin/python results/storages_frontier/table.py
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
HEAVY='KVQuant|PQ|Hadamard|int2'  # rows that calibrate k-means (KVQuant, PQ) or rotate, in the second process
ONLY="^(?!.*($HEAVY))" RECORDS=results/storages_frontier/records.a.jsonl $PY results/storages_frontier/measure.py &
a=$!
ONLY="$HEAVY" RECORDS=results/storages_frontier/records.b.jsonl $PY results/storages_frontier/measure.py
wait $a
cat results/storages_frontier/records.a.jsonl results/storages_frontier/records.b.jsonl \
  > results/storages_frontier/records.jsonl
rm results/storages_frontier/records.a.jsonl results/storages_frontier/records.b.jsonl
