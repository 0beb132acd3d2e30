#!/usr/bin/env bash
# lm-eval harness tasks x caches on SmolLM2-135M (CPU, shared machine), records -> results/lm_eval/records.jsonl,
# table -> results/lm_eval/README.md. Run from the repository root:  bash results/lm_eval/run.sh
set -u
OUT=results/lm_eval
COMMON=(model=smollm2-135m eval=lm_eval "eval.limit={kvc_wikitext2:1,kvc_tinystories_cloze:24,kvc_passkey:5}"
        eval.chunk=32 eval.batch_size=8 results_dir=$OUT progress=false)
CACHES=("cache=full" "cache=int8" "cache=kivi cache.bits=4" "cache=lowrank cache.rank_fraction=0.5"
        "cache=h2o cache.budget=0.25")
[ -f conf/cache/cla.yaml ] && CACHES+=("cache=cla cache.group=2")
for c in "${CACHES[@]}"; do
  # shellcheck disable=SC2086
  .venv/bin/kvc "${COMMON[@]}" $c
done
.venv/bin/python -m kvcompress.harness.table $OUT --command "bash results/lm_eval/run.sh" \
  --intro "SmolLM2-135M (fp32 weights, CPU), eval=lm_eval with chunk=32 (tokens per forward step, so compressed \
caches see 32-token appends), batch 8, rolling window 1024. Small example counts to fit a shared 2-core CPU: \
read the numbers as a smoke-level comparison, not a benchmark."
