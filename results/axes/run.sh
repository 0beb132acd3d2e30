#!/usr/bin/env bash
# The three axes on SmolLM2-135M: the four commands of issue 13 ("Three axes, one cache"), with the cache in
# the loop on WikiText-2 (2 windows of 1024 tokens, 16 tokens per step). Records, summary.md and plots go to
# results/axes/; `kvc-report --table results/axes` writes README.md from them (spec: table.yaml).
set -euo pipefail
cd "$(dirname "$0")/../.."
EVAL=(eval=ppl eval.dataset=wikitext2 eval.window=1024 eval.max_windows=2 eval.chunk=16 eval.batch_size=2)
ARGS=("${EVAL[@]}" results_dir=results/axes publish=true progress=false)
KVC=(.venv/bin/kvc "${ARGS[@]}")
"${KVC[@]}" storage=kivi storage.bits=2 policy=h2o policy.budget=256 layout=minicache layout.start_layer=15
"${KVC[@]}" storage=latent storage.rank_fraction=0.5 storage.joint_kv=true policy=snapkv policy.budget=0.5
"${KVC[@]}" storage=int8 layout=cla layout.groups=auto layout.share_fraction=0.2 policy=streaming policy.budget=0.25
# the Cartesian product in one line (a shared budget for both policies: 25% of the tokens)
.venv/bin/kvc -m "${ARGS[@]}" storage=dense,int4,kivi policy=none,h2o,snapkv layout=per_layer,cla policy.budget=0.25
.venv/bin/kvc-report --table results/axes
