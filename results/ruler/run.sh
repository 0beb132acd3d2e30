#!/usr/bin/env bash
# eval=ruler on SmolLM2-135M-Instruct (CPU-sized): records go to results/ruler/records.jsonl, then
#   .venv/bin/kvc-report --table results/ruler   (README.md and acc_vs_ratio.png; spec: table.yaml)
# Usage: results/ruler/run.sh [small|wide]   (default small: what results/ruler/README.md reports)
#   small: 2 needle tasks x 1k tokens x 4 samples, both protocols; full cache, then H2O / SnapKV / StreamingLLM
#          compressing once at prefill end to 25% of the tokens, then KIVI-2; about 20 min on a busy 2-core CPU.
#   wide:  the issue's grid (12 tasks, 1k/2k/4k, 50% and 25%, more policies and storages); hours on CPU, meant
#          for a GPU (device=cuda).
# One thread per process: the shared CPU was oversubscribed and multi-threaded BLAS only thrashed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
kvc() { .venv/bin/kvc "$@" model=smollm2-135m eval=ruler eval.protocol=both eval.chat=true results_dir=results/ruler \
        progress=false; }
case ${1:-small} in
  small)
    set -- "eval.tasks=[niah_single_1,niah_single_2]" "eval.lengths=[1024]" eval.samples=4 eval.batch_size=4 \
           eval.max_new_tokens=16
    kvc "$@"
    kvc -m "$@" policy=snapkv,h2o,streaming policy.budget=0.25 policy.when=prefill
    kvc "$@" storage=kivi ;;
  wide)
    set -- "eval.lengths=[1024,2048,4096]" eval.samples=8 eval.batch_size=8
    kvc "$@"
    kvc -m "$@" policy=streaming,h2o,snapkv,tova,knorm,random policy.budget=0.5,0.25 policy.when=prefill
    kvc -m "$@" storage=kivi,int4
    kvc "$@" storage=latent storage.rank_fraction=0.5 ;;
  *) echo "unknown stage $1 (small | wide)" >&2; exit 2 ;;
esac
