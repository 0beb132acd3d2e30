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
.venv/bin/python -m kvcompress.harness.table $OUT --command "bash results/lm_eval/run.sh" \
  --intro "SmolLM2-135M (fp32 weights, CPU), eval=lm_eval with chunk=32 (tokens per forward step, so compressed \
caches see 32-token appends), batch 8, rolling=ppl (eval=ppl's windows of 1024 tokens). Small example counts (the \
first 3 wikitext articles; 50 cloze questions; 10 passkey prompts of ~500 tokens, 2 per depth 0, 0.25, 0.5, 0.75, \
1): a comparison at a glance, not a benchmark (one cloze question is 2 points of accuracy). One run per cache, one \
after the other on an otherwise idle CPU. No KV-ratio column: rows of a batch are right-padded, and the records' \
compression_ratio counts the padding slots the cache holds against an fp16 reference of real tokens only, so it is \
not the cache's compression; see results/quant, results/eviction, results/lowrank, results/sharing and \
results/compare_all for ratios from eval=ppl. The records were made before the three axes, by run.sh's old \
\`cache=\` names (run.sh now passes the same settings as axes: \`cache=lowrank\` is \`storage=latent\`, \
\`cache=h2o\` is \`policy=h2o\`, \`cache=cla\` is \`layout=cla\`, ...), and given their axis fields by \`python \
scripts/migrate_records.py results/lm_eval/records.jsonl\` (numbers unchanged; each record has a \`migrated\` field \
and keeps its old \`cache\` / \`cache_params\` under \`pre_axes\`); the table alone is rebuilt by \`bash \
results/lm_eval/run.sh table\`."
