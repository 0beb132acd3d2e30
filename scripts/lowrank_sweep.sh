#!/usr/bin/env bash
# Every run behind results/lowrank/README.md (SmolLM2-135M, WikiText-2, cache in the loop), then the table.
#   bash scripts/lowrank_sweep.sh [all|grid|variants]   (a rerun skips runs whose ok record is in $RESULTS)
# Environment: KVC (default .venv/bin/kvc), PY (.venv/bin/python), RESULTS (results/lowrank), KVC_ARGS (extra
# overrides for every run, e.g. "device=cuda model.source=/path/to.gguf"); scripts/lowrank_gpu.sh uses them.
set -euo pipefail
cd "$(dirname "$0")/.."
KVC=${KVC:-.venv/bin/kvc}
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results/lowrank}
read -r -a X <<< "${KVC_ARGS:-} results_dir=$RESULTS"
part=${1:-all}
# projections for every PCA setting used here, from one pass over the calibration text, + the energy plot
$PY scripts/lowrank_energy.py out="$RESULTS" $(printf '%s\n' "${X[@]}" | grep '^model\.' || true)
if [[ $part == all || $part == grid ]]; then
  # perplexity: the full-cache baseline (storage=dense), then rank fraction 0.75/0.5/0.25 x separate/joint latents
  $KVC experiment=lowrank_sweep storage=dense "${X[@]}" || true
  $KVC -m experiment=lowrank_sweep "${X[@]}"
fi
if [[ $part == all || $part == variants ]]; then
  # decode speed at 2k context: full (storage=dense), then reconstructed vs absorbed (adjacent runs) for the joint
  # latent with 16 rope dims, compressed keys rotated (values absorbed) or not (nope: keys absorbed too)
  $KVC experiment=lowrank_speed storage=dense "${X[@]}" || true
  $KVC -m experiment=lowrank_speed seed=0 "${X[@]}"
  # perplexity variants at rank fraction 0.5: decoupled rope dims, post-RoPE keys, int8 latents
  $KVC -m experiment=lowrank_sweep storage.rank_fraction=0.5 storage.joint_kv=false storage.rope_dims=16 "${X[@]}"
  $KVC -m experiment=lowrank_sweep storage.rank_fraction=0.5 storage.joint_kv=true storage.rope_dims=16 \
      storage.nope=true "${X[@]}"
  $KVC -m experiment=lowrank_sweep storage.rank_fraction=0.5 storage.joint_kv=false storage.keys=post_rope "${X[@]}"
  $KVC -m experiment=lowrank_sweep storage.rank_fraction=0.5 storage.joint_kv=false storage.latent_bits=8 "${X[@]}"
  # int8 joint latents (the best trade-off above; run last, on the CPU, in the recorded table)
  $KVC -m experiment=lowrank_sweep storage.rank_fraction=0.75,0.5 storage.joint_kv=true storage.latent_bits=8 "${X[@]}"
fi
$PY -m kvcompress.report.cli --table "$RESULTS" --spec results/lowrank/table.yaml
