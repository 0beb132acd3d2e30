#!/usr/bin/env bash
# Issue 17's storages and layout on SmolLM2-135M, WikiText-2, cache in the loop: KVQuant vs KIVI, GEAR vs KIVI-2,
# ThinK alone and over KIVI (results/quant/storages/), xKV vs per-layer latents (results/lowrank/xkv/).
#   bash scripts/storages_sweep.sh [quant|think|gear|xkv|extra ...]   (no part: all but extra), then
#   kvc-report --table results/quant/storages && kvc-report --table results/lowrank/xkv
# Sized for the shared 2-core CPU: the first window of 1024 tokens (the same first window as the quant and lowrank
# tables, which use 16 and 4), chunk 64, calibration on 2,048 TinyStories tokens. Rows compare only with each
# other. Environment: KVC (default .venv/bin/kvc), WINDOWS (default 1), KVC_ARGS (extra overrides).
set -uo pipefail
cd "$(dirname "$0")/.."
KVC=${KVC:-.venv/bin/kvc}
read -r -a X <<< "eval=ppl eval.dataset=wikitext2 eval.window=1024 eval.max_windows=${WINDOWS:-1} eval.chunk=64 \
eval.batch_size=1 calibration.tokens=2048 progress=false ${KVC_ARGS:-}"
Q=(results_dir=results/quant/storages)
L=(results_dir=results/lowrank/xkv)
parts=("$@"); [[ ${#parts[@]} -eq 0 ]] && parts=(quant think gear xkv)
# the rows of the committed tables; `extra` lists settings not measured there (the CPU time ran out)
for part in "${parts[@]}"; do
  case $part in
    quant)
      $KVC storage=dense "${X[@]}" "${Q[@]}"
      for b in 4 3 2; do for f in 0.01 0; do
        $KVC storage=kvquant storage.bits=$b storage.outlier_fraction=$f "${X[@]}" "${Q[@]}"
      done; done
      for br in "4 128" "2 128" "2 32"; do read -r b r <<< "$br"
        $KVC storage=kivi storage.bits=$b storage.residual=$r "${X[@]}" "${Q[@]}"
      done ;;
    think)
      for p in 0.4 0.6; do
        $KVC storage=think storage.prune_fraction=$p "${X[@]}" "${Q[@]}"
        $KVC storage=think storage.prune_fraction=$p storage.bits=2 storage.residual=128 "${X[@]}" "${Q[@]}"
      done ;;
    gear)
      for r in 0 128; do $KVC storage=gear storage.residual=$r "${X[@]}" "${Q[@]}"; done ;;
    xkv)
      $KVC storage=latent storage.rank_fraction=0.5 "${X[@]}" "${L[@]}"
      $KVC storage=latent storage.rank_fraction=0.5 layout=xkv layout.group_size=2 "${X[@]}" "${L[@]}" ;;
    extra)
      $KVC storage=latent storage.rank_fraction=0.75 "${X[@]}" "${L[@]}"
      $KVC storage=latent storage.rank_fraction=0.75 layout=xkv layout.group_size=2 "${X[@]}" "${L[@]}" ;;
  esac
done
