#!/usr/bin/env bash
# Issue 25's RULER needle tasks for the frontier storages against int4, KIVI and KVQuant on SmolLM2-135M-Instruct:
# niah_single_1 and niah_single_2 at 1024 tokens (where the full cache passes: results/ruler), 4 samples each,
# query-aware, chat template, 16 new tokens; every storage with the settings of its row in measure.py. Records go
# to results/storages_frontier/ruler/records.jsonl; table.yaml adds them to README.md.
#   bash results/storages_frontier/ruler.sh && .venv/bin/kvc-report --table results/storages_frontier
set -euo pipefail  # the list runs in order of interest: stop it when time runs out
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SKIP=${SKIP:-0}  # the first SKIP runs are already recorded
n=0
kvc() { n=$((n + 1)); [ "$n" -le "$SKIP" ] && return 0; .venv/bin/kvc "$@" model=smollm2-135m eval=ruler "eval.tasks=[niah_single_1,niah_single_2]" \
        "eval.lengths=[1024]" eval.samples=4 eval.batch_size=4 eval.max_new_tokens=16 eval.protocol=query_aware \
        eval.chat=true results_dir=results/storages_frontier/ruler progress=false; }
kvc                                                             # full cache
kvc storage=kvtc storage.bits=3.0 storage.residual=0 storage.sink=0
kvc storage=kvtc storage.bits=2.0 storage.residual=0 storage.sink=0
kvc storage=fp8                                                 # (runs 1-4 recorded first; the rest by interest)
kvc storage=rotated                                             # Hadamard + int4 g32
kvc storage=int4 storage.group_size=32
kvc storage=kivi storage.bits=2 storage.residual=32
kvc storage=rotated_kivi storage.bits=2 storage.residual=32     # Hadamard + KIVI-2
kvc storage=rotated storage.key_bits=2 storage.value_bits=2     # Hadamard + int2
kvc storage=fp4 storage.format=nvfp4
kvc storage=kvquant storage.bits=3
kvc storage=kivi storage.bits=4 storage.residual=32
kvc storage=kvtc storage.bits=4.0 storage.residual=0 storage.sink=0
kvc storage=kvquant storage.bits=4
kvc storage=fp4 storage.format=mxfp4
kvc storage=rotated storage.value_bits=2                        # Hadamard + int4 K / int2 V
