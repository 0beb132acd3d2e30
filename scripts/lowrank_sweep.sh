#!/usr/bin/env bash
# Every run behind results/lowrank/README.md (SmolLM2-135M, WikiText-2, cache in the loop), then the table.
#   bash scripts/lowrank_sweep.sh            (~1.5 h on a busy 2-core CPU; finished runs are skipped on rerun)
set -euo pipefail
cd "$(dirname "$0")/.."
KVC=.venv/bin/kvc
# projections for every PCA setting below, from one pass over the calibration text, + the energy plot
.venv/bin/python scripts/lowrank_energy.py
# perplexity: baseline, then rank fraction x separate/joint (the experiment's grid)
$KVC experiment=lowrank_sweep cache=full || true
$KVC -m experiment=lowrank_sweep
# decode speed at 2k context: full, then absorbed vs reconstructed (adjacent runs), twice
for seed in 0 1; do $KVC experiment=lowrank_speed cache=full seed=$seed || true; done
$KVC -m experiment=lowrank_speed
.venv/bin/python scripts/lowrank_table.py
# perplexity variants: decoupled rope dims (rotated or not), post-RoPE keys, int8 latents, per head, rank=auto
$KVC -m experiment=lowrank_sweep cache.joint_kv=false,true cache.rank_fraction=0.5 cache.rope_dims=16 \
    cache.nope=false,true
$KVC -m experiment=lowrank_sweep cache.joint_kv=false cache.rank_fraction=0.75,0.5,0.25 cache.keys=post_rope
$KVC -m experiment=lowrank_sweep cache.joint_kv=false cache.rank_fraction=0.5,0.25 cache.latent_bits=8
$KVC -m experiment=lowrank_sweep cache.joint_kv=false cache.rank_fraction=0.5 cache.per_head=true
$KVC -m experiment=lowrank_sweep cache.joint_kv=false cache.rank_fraction=0.5 cache.rank=auto \
    cache.energy=0.9,0.95,0.99
.venv/bin/python scripts/lowrank_table.py
