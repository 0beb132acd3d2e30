#!/usr/bin/env bash
# Every run behind results/sharing/README.md (SmolLM2-135M, WikiText-2, cache in the loop), then the table.
#   bash scripts/sharing_sweep.sh [all|ppl|speed]   (a rerun skips runs whose ok record is in $RESULTS)
# Environment: KVC (default .venv/bin/kvc), PY (.venv/bin/python), RESULTS (results/sharing), KVC_ARGS (extra
# overrides for every run, e.g. "device=cuda").
set -euo pipefail
cd "$(dirname "$0")/.."
KVC=${KVC:-.venv/bin/kvc}
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-results/sharing}
read -r -a X <<< "${KVC_ARGS:-} results_dir=$RESULTS"
part=${1:-all}
if [[ $part == all || $part == ppl ]]; then
  $KVC experiment=sharing_sweep layout=per_layer "${X[@]}" || true
  # CLA: uniform group sizes 2 and 3; auto at the same share fractions (ppl- and cosine-ranked) and below
  $KVC -m experiment=sharing_sweep layout.group_size=2,3 "${X[@]}"
  # uniform groups over the deep layers only: 6 consumers (share 0.2) as pairs or triples, 14 consumers as pairs
  $KVC -m experiment=sharing_sweep layout.group_size=2 layout.start_layer=2,18 "${X[@]}"
  $KVC -m experiment=sharing_sweep layout.group_size=3 layout.start_layer=21 "${X[@]}"
  $KVC -m experiment=sharing_sweep layout.groups=auto layout.share_fraction=0.1,0.2,0.3,0.5,0.667 "${X[@]}"
  $KVC -m experiment=sharing_sweep layout.groups=auto layout.auto_metric=cosine layout.share_fraction=0.2,0.5 "${X[@]}"
  # composition with int8 storage (storage=int8: group 64 per token, fp16 scale + zero)
  $KVC -m experiment=sharing_sweep layout.group_size=2 storage=int8 "${X[@]}"
  $KVC -m experiment=sharing_sweep layout.groups=auto layout.share_fraction=0.2 storage=int8 "${X[@]}"
  # MiniCache: start depths at the default retention angle, then retention angles from layer 15 (pi: merge all)
  $KVC -m experiment=sharing_sweep layout=minicache layout.start_layer=10,15,20,25 "${X[@]}"
  $KVC -m experiment=sharing_sweep layout=minicache layout.start_layer=15 \
      layout.threshold=1.6,1.7,1.9,2.1,3.141592653589793 "${X[@]}"
  $KVC -m experiment=sharing_sweep layout=minicache layout.start_layer=25 storage=int8 "${X[@]}"
fi
if [[ $part == all || $part == speed ]]; then
  # prefill and decode speed: full (layout=per_layer; first and last, against drift), CLA with the consumer
  # projections skipped / computed (adjacent runs), MiniCache
  $KVC experiment=sharing_speed layout=per_layer seed=0 "${X[@]}" || true
  $KVC -m experiment=sharing_speed seed=0,1 layout.group_size=2,3 layout.skip_projections=true,false "${X[@]}"
  $KVC -m experiment=sharing_speed seed=0,1 layout=minicache layout.start_layer=15 "${X[@]}"
  $KVC experiment=sharing_speed layout=per_layer seed=1 "${X[@]}" || true
fi
# the layer-similarity heatmap (written by the groups=auto calibration), the sweep report, this family's tables
$PY scripts/sharing_heatmap.py --out "$RESULTS/similarity.png" > "$RESULTS/similarity.md"
$PY -m kvcompress.report.cli "$RESULTS" --command "bash scripts/sharing_sweep.sh"
$PY -m kvcompress.report.cli --table "$RESULTS" --spec results/sharing/table.yaml
