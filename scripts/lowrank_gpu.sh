#!/usr/bin/env bash
# The lowrank sweep on a GPU machine with no network (the `run` device tool): the repo travels with
# .lrgpu/ (ignored; pure-Python hydra/omegaconf/antlr4/gguf from the venv, WikiText-2 + TinyStories, the
# SmolLM2 GGUF split in two because one call carries at most 64 MiB):
#   call 1: bash scripts/lowrank_gpu.sh stage      (carry .lrgpu/ga)
#   call 2: bash scripts/lowrank_gpu.sh run        (carry .lrgpu/gb .lrgpu/site .lrgpu/data)
set -euo pipefail
cd "$(dirname "$0")/.."
W=/tmp/lr
mkdir -p $W
if [[ ${1:-} == stage ]]; then cp .lrgpu/ga/part_aa $W/; ls -la $W; exit 0; fi
G=$W/SmolLM2-135M-Instruct.Q4_1.gguf
cat $W/part_aa .lrgpu/gb/part_ab .lrgpu/gb/part_ac > $G
[[ $(sha256sum $G | cut -c1-64) == $(cat .lrgpu/gb/sha) ]] || { echo "gguf checksum mismatch"; exit 1; }
export PYTHONPATH=$PWD:$PWD/.lrgpu/site KVC_DATA_DIR=$PWD/.lrgpu/data KVC_CALIBRATION_DIR=$W/calib PYTHONUNBUFFERED=1
export KVC="python3 -m kvcompress.run" PY=python3 RESULTS=$W/results KVC_ARGS="device=cuda model.source=$G"
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $W/results
keep() { cp $W/results/{records.jsonl,README.md,energy.png,energy.md,attend_bench_cuda.md,attend_bench_cpu.md} \
  "${OUT:-$W}/" 2>/dev/null || true; }
trap keep EXIT
timeout ${SWEEP_S:-470} bash scripts/lowrank_sweep.sh all 2>&1 | grep -vE "it/s\]|s/it\]" || true
timeout 60 python3 scripts/lowrank_bench_attend.py --device cuda --out $W/results 2>&1 | grep -v "lowrank calib" || true
timeout 50 python3 scripts/lowrank_bench_attend.py --device cpu --out $W/results --steps 4 --reps 2 2>&1 \
  | grep -v "lowrank calib" || true
python3 -m kvcompress.report.cli --table $W/results --spec results/lowrank/table.yaml || true
