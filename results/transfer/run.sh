#!/usr/bin/env bash
# The transfer study (issue 23): the same 14 caches (conf/experiment/transfer.yaml) on SmolLM2-135M, Qwen2.5-0.5B
# and Qwen2.5-1.5B. Records go to results/transfer/records.jsonl (a re-run skips ok jobs), then
#   kvc-report --table results/transfer (README.md, from results/transfer/table.yaml)
# Usage: results/transfer/run.sh [text-1.5b|-0.5b|-smollm2] [ruler] [ruler-0.5b] [check-1.5b] [checks] (default: all)
#   text-*: eval=prefill_decode: 2 pieces of 384 + 128 tokens per text, the prompt compressed once at its end,
#           the 128 following tokens teacher-forced 32 at a time; SmolLM2 and Qwen2.5-0.5B on Hamlet and
#           Paradise Lost, Qwen2.5-1.5B on Hamlet only (a job takes ~6 min here: a shared 2-core CPU at load ~15).
#   ruler:  eval=ruler, needle tasks niah_single_1/2 at 1,024 tokens, 4 prompts each, query-aware, chat template;
#           the full cache first (a model whose full cache fails is not ranked on it): SmolLM2 all 14 caches,
#   ruler-0.5b: Qwen2.5-0.5B the full cache and 6 caches (CPU time); Qwen2.5-1.5B is not run on RULER here.
#   check-1.5b, checks: issue 23's "Done means" commands at small sizes (Qwen2.5-1.5B kivi x snapkv; Gemma 3
#           on eval=ruler, full cache and H2O 25%).
# One thread per process: the shared CPU was oversubscribed and multi-threaded BLAS only thrashed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
kvc() { nice -n 10 .venv/bin/kvc "$@" progress=false publish=true; }
text=(eval=prefill_decode eval.context=384 eval.continuation=128 eval.samples=2 eval.prefill_chunk=384
      eval.continuation_chunk=32)
# the larger models' order: policies interleaved with storages (a cut run still ranks both axes), CLA last (its
# calibration is one NLL pass per layer over the calibration text)
order=+experiment/point=full,snapkv_25p,int4,h2o_25p,kivi2,streaming_25p,kvquant3,kvzip_25p,latent_50,ea_25p,int8
order+=,adakv_25p,cla_auto_20,int4_snapkv_50p_cla
ruler=(eval=ruler "eval.tasks=[niah_single_1,niah_single_2]" "eval.lengths=[1024]" eval.samples=4 eval.batch_size=4
       eval.max_new_tokens=16 eval.chat=true eval.protocol=query_aware)
for stage in ${@:-text-1.5b text-0.5b text-smollm2 ruler ruler-0.5b check-1.5b checks}; do
  case $stage in
    text-1.5b) kvc -m experiment=transfer model=qwen2.5-1.5b "${text[@]}" eval.dataset=hamlet "$order" ;;
    text-0.5b) kvc -m experiment=transfer model=qwen2.5-0.5b "${text[@]}" eval.dataset=hamlet,paradise_lost "$order" ;;
    text-smollm2) kvc -m experiment=transfer model=smollm2-135m "${text[@]}" eval.dataset=hamlet,paradise_lost ;;
    ruler)  # a job takes ~3 min on SmolLM2 and ~3x that on Qwen2.5-0.5B here: the latter runs 7 of the caches
      kvc experiment=transfer model=smollm2-135m "${ruler[@]}" +experiment/point=full
      kvc -m experiment=transfer model=smollm2-135m "${ruler[@]}" ;;
    ruler-0.5b)
      kvc experiment=transfer model=qwen2.5-0.5b "${ruler[@]}" +experiment/point=full
      kvc -m experiment=transfer model=qwen2.5-0.5b "${ruler[@]}" \
        +experiment/point=kivi2,snapkv_25p,h2o_25p,streaming_25p,kvzip_25p,int4 ;;
    check-1.5b)
      kvc model=qwen2.5-1.5b storage=kivi policy=snapkv policy.budget=0.25 eval.max_windows=1 eval.window=192 \
        results_dir=results/transfer/checks ;;
    checks)
      kvc model=gemma3-270m eval=ruler "eval.tasks=[niah_single_1]" "eval.lengths=[512,1024]" eval.samples=4 \
        results_dir=results/transfer/checks
      kvc model=gemma3-270m policy=h2o policy.budget=0.25 eval=ruler "eval.tasks=[niah_single_1]" \
        "eval.lengths=[512,1024]" eval.samples=4 results_dir=results/transfer/checks ;;
    *) echo "unknown stage $stage (text-1.5b | text-0.5b | text-smollm2 | ruler | ruler-0.5b | check-1.5b |" \
         "checks)" >&2; exit 2 ;;
  esac
done
