#!/usr/bin/env bash
# lm-eval harness tasks x caches on SmolLM2-135M (CPU, shared machine), records -> results/lm_eval/records.jsonl,
# table -> results/lm_eval/README.md. Run from the repository root:  bash results/lm_eval/run.sh
# Lanes run side by side (the shared 2-core CPU, loaded by ~7 engineers, gave 3-8 tokens/s to one process).
set -u
OUT=results/lm_eval
COMMON=(model=smollm2-135m eval=lm_eval "eval.limit={kvc_wikitext2:1,kvc_tinystories_cloze:10,kvc_passkey:3}"
        eval.chunk=32 eval.batch_size=8 results_dir=$OUT progress=false)
lane() {
  for c in "$@"; do
    # shellcheck disable=SC2086
    .venv/bin/kvc "${COMMON[@]}" $c
  done
}
lane "cache=full" &
lane "cache=int8" &
lane "cache=kivi cache.bits=4" &
lane "cache=h2o cache.budget=0.25" "cache=lowrank cache.rank_fraction=0.5" &
wait
.venv/bin/python -m kvcompress.harness.table $OUT --command "bash results/lm_eval/run.sh" \
  --intro "SmolLM2-135M (fp32 weights, CPU), eval=lm_eval with chunk=32 (tokens per forward step, so compressed \
caches see 32-token appends), batch 8, rolling window 1024. Tiny example counts (first wikitext article = 1438 \
tokens; 10 cloze questions; 3 passkey prompts of ~500 tokens at depths 0, 0.5, 1) to fit a shared 2-core CPU: \
a smoke-level comparison, not a benchmark. CLA was not in the repo when this ran, so it is left out. No KV-ratio \
column: rows of a batch are right-padded, and the records' compression_ratio counts the padding slots the cache \
holds against an fp16 reference of real tokens only (the full fp32 cache showed 0.33x), so it is not the cache's \
compression; see results/quant, results/eviction, results/lowrank and results/compare_all for ratios from eval=ppl."
