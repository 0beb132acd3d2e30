#!/usr/bin/env bash
# lm-eval harness tasks x caches on SmolLM2-135M (CPU), records -> results/lm_eval/records.jsonl,
# table -> results/lm_eval/README.md. Run from the repository root:  bash results/lm_eval/run.sh
# `bash results/lm_eval/run.sh table` rebuilds the table from the records without running anything.
set -u
OUT=results/lm_eval
# eval.rolling=ppl: the records were scored with eval=ppl's windows (the default was ppl then; it is lm_eval now)
COMMON=(model=smollm2-135m eval=lm_eval "eval.limit={kvc_wikitext2:3,kvc_tinystories_cloze:50,kvc_passkey:10}"
        eval.chunk=32 eval.batch_size=8 eval.rolling=ppl results_dir=$OUT progress=false)
[[ ${1:-} == table ]] ||
for c in "storage=dense" "storage=int8" "storage=kivi storage.bits=4" "policy=h2o policy.budget=0.25" \
         "storage=latent storage.rank_fraction=0.5" "layout=cla layout.groups=auto layout.share_fraction=0.2" \
         "layout=minicache layout.start_layer=25"; do
  # shellcheck disable=SC2086
  .venv/bin/kvc "${COMMON[@]}" $c
done
.venv/bin/kvc-report --table $OUT  # README.md from the records (spec: results/lm_eval/table.yaml)
