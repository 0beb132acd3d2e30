#!/usr/bin/env bash
# Issue 29, item 6: does KV compression make CPU decode faster once the step is compiled? Decode tok/s (kvc
# eval=speed, teacher-forced, 16 steps, median of 2 passes) of full / int8 / int4 / KIVI-2 / latent 0.5 / SnapKV 25%
# at contexts 1k, 4k, 8k (8176: SmolLM2's 8192 positions minus the decoded tokens), batch 1 and 8, on the eager path
# and on the compiled static step (eval.decode_path=compiled: kvcompress/engine/compiled.py; SnapKV compresses at the
# end of prefill and has no static form: eager only), SmolLM2-135M on this CPU, into results/cpu_bench/compression/.
#   bash scripts/cpu_compression_speed.sh                      # the whole matrix: long (a compile per cache and shape)
#   CONTEXTS=1024 BATCHES=1 bash scripts/cpu_compression_speed.sh   # a small slice first
#   DTYPE=bfloat16 PATHS=compiled OUT=/tmp/c bash scripts/cpu_compression_speed.sh
# Then the table: kvc-report --table results/cpu_bench/compression --spec results/cpu_bench/table.yaml (run last here).
# Speed figures need a quiet machine: the records keep the passes' spread (noisy: 1 when they disagree by > 20%).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/cpu_bench/compression}
CONTEXTS=${CONTEXTS:-1024,4096,8176}
BATCHES=${BATCHES:-1,8}
PATHS=${PATHS:-eager,compiled}
DTYPE=${DTYPE:-float32}
MODEL=(model=smollm2-135m device=cpu dtype="$DTYPE")
KVC=(.venv/bin/kvc -m "${MODEL[@]}" results_dir="$OUT" progress=false)
SPEED=(eval=speed eval.context="$CONTEXTS" eval.batch_size="$BATCHES" eval.decode_tokens=16 eval.repeats=2
       eval.prefill_chunk=2048 eval.dataset=wikitext2)
mkdir -p "$OUT"
"${KVC[@]}" "${SPEED[@]}" eval.decode_path="$PATHS" storage=dense,int8,int4 "$@"
"${KVC[@]}" "${SPEED[@]}" eval.decode_path="$PATHS" storage=kivi storage.bits=2 "$@"
"${KVC[@]}" "${SPEED[@]}" eval.decode_path="$PATHS" storage=latent storage.rank_fraction=0.5 storage.absorb=true "$@"
"${KVC[@]}" "${SPEED[@]}" eval.decode_path=eager policy=snapkv policy.budget=0.25 "$@"
DEVICE="CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(.venv/bin/python -c \
  'import torch; print(torch.get_num_threads())') threads" SETTINGS="${MODEL[*]}" \
  COMMAND="CONTEXTS=$CONTEXTS BATCHES=$BATCHES PATHS=$PATHS DTYPE=$DTYPE bash scripts/cpu_compression_speed.sh" \
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || true) .venv/bin/python -c '
import json, os
print(json.dumps({"device": os.environ["DEVICE"], "model": os.environ["SETTINGS"], "commit": os.environ["COMMIT"],
                  "engine": None, "command": os.environ["COMMAND"]}))' > "$OUT/bench.jsonl"
.venv/bin/kvc-report --table "$OUT" --spec results/cpu_bench/table.yaml && cat "$OUT/table.md"
