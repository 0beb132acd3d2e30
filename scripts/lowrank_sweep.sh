#!/usr/bin/env bash
# Every run behind results/lowrank/README.md (SmolLM2-135M, WikiText-2, cache in the loop), then the table.
#   bash scripts/lowrank_sweep.sh [all|grid|variants]   (grid and variants may run side by side; ~50 min each on a
#   busy 2-core CPU; a rerun skips runs whose ok record is already in results/lowrank)
set -euo pipefail
cd "$(dirname "$0")/.."
KVC=.venv/bin/kvc
part=${1:-all}
# projections for every PCA setting used here, from one pass over the calibration text, + the energy plot
.venv/bin/python scripts/lowrank_energy.py
if [[ $part == all || $part == grid ]]; then
  # perplexity: the full-cache baseline, then rank fraction 0.75/0.5/0.25 x separate/joint latents
  $KVC experiment=lowrank_sweep cache=full || true
  $KVC -m experiment=lowrank_sweep
fi
if [[ $part == all || $part == variants ]]; then
  # decode speed at 2k context: full, then reconstructed vs absorbed (adjacent runs) for the joint latent with
  # 16 rope dims, compressed keys rotated (values absorbed) or not (nope: keys absorbed too)
  $KVC experiment=lowrank_speed cache=full || true
  $KVC -m experiment=lowrank_speed seed=0
  # perplexity variants at rank fraction 0.5: decoupled rope dims, post-RoPE keys, int8 latents
  $KVC -m experiment=lowrank_sweep cache.rank_fraction=0.5 cache.joint_kv=false cache.rope_dims=16
  $KVC -m experiment=lowrank_sweep cache.rank_fraction=0.5 cache.joint_kv=true cache.rope_dims=16 cache.nope=true
  $KVC -m experiment=lowrank_sweep cache.rank_fraction=0.5 cache.joint_kv=false cache.keys=post_rope
  $KVC -m experiment=lowrank_sweep cache.rank_fraction=0.5 cache.joint_kv=false cache.latent_bits=8
fi
.venv/bin/python scripts/lowrank_table.py
