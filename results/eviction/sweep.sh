#!/usr/bin/env bash
# The eviction tables on SmolLM2-135M (CPU). Records go to results/eviction/records.jsonl, then
#   .venv/bin/kvc-report --table results/eviction   (README.md and policies_ppl.png; spec: table.yaml)
# Usage: results/eviction/sweep.sh [ppl] [prefill_decode] [passkey] [speed] [policies] [paged]   (default: all)
# One thread per process: the shared CPU was oversubscribed and multi-threaded BLAS only thrashed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
kvc() { .venv/bin/kvc "$@" progress=false; }
stages=("${@:-ppl prefill_decode passkey speed policies paged}")
for stage in ${stages[@]}; do
  case $stage in
    ppl)
      kvc experiment=eviction_ppl policy=none publish=true
      kvc -m experiment=eviction_ppl policy=streaming policy.sinks=0 publish=true
      kvc -m experiment=eviction_ppl publish=true ;;
    prefill_decode)
      kvc experiment=eviction_prefill_decode policy=none publish=true
      kvc -m experiment=eviction_prefill_decode policy=streaming policy.sinks=0 publish=true
      kvc -m experiment=eviction_prefill_decode publish=true ;;
    passkey)
      kvc experiment=eviction_passkey policy=none publish=true
      kvc -m experiment=eviction_passkey publish=true ;;
    policies)  # issue 16: every policy at 50% / 25%, 2,048-token prompt compressed once, the next 256 tokens scored
      kvc experiment=eviction_policies policy=none publish=true
      kvc -m experiment=eviction_policies publish=true
      kvc -m experiment=eviction_policies policy=expected_attention policy.per_head=true publish=true
      kvc -m experiment=eviction_policies policy=cam policy.normalize=false publish=true  # the paper's additive merge
      kvc -m experiment=eviction_policies policy=adakv policy/scorer=expected_attention,kvzip publish=true
      kvc -m experiment=eviction_policies policy=duo_attention calibration.window=256 calibration.tokens=512 \
        publish=true ;;
    paged)  # AdaKV over SnapKV with uneven heads in pages, and the same runs padded (padded.py) for the table
      kvc -m experiment=eviction_policies policy=adakv publish=true
      .venv/bin/python results/eviction/padded.py -m experiment=eviction_policies policy=adakv \
        results_dir=results/eviction/padded publish=true progress=false ;;
    speed)  # rounds interleaved: every policy of round (seed) 0, then of round 1; force=true re-measures
      for seed in 0 1; do
        kvc -m experiment=eviction_speed seed=$seed force=true publish=true
        kvc -m experiment=eviction_speed seed=$seed force=true policy=streaming policy.slack=64 publish=true
        kvc -m experiment=eviction_speed seed=$seed force=true policy=h2o policy.slack=64 publish=true
      done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
