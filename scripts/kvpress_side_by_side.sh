#!/usr/bin/env bash
# Issue 24: kvcompress beside NVIDIA kvpress 0.5.5 on identical token ids (never in setup or CI: it installs kvpress
# and transformers 5.2 into their own virtual environment under the cache folder). Writes results/kvpress/.
# Sized for a 2-core CPU (~25 minutes): CONTEXT=2048 CONTINUATION=256 SAMPLES=1, as results/eviction (the issue's
# run: 4 pieces).
#   bash scripts/kvpress_side_by_side.sh            CONTEXT=2048 CONTINUATION=256 SAMPLES=4 bash scripts/...
set -euo pipefail
cd "$(dirname "$0")/.."
CONTEXT=${CONTEXT:-2048}; CONTINUATION=${CONTINUATION:-256}; SAMPLES=${SAMPLES:-1}
VENV=${KVPRESS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kvcompress/kvpress-0.5.5}
OUT=results/kvpress
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==2.13.0" "kvpress==0.5.5" "transformers==5.2.*" gguf
fi
GGUF=$(.venv/bin/python -m kvcompress.engine.loaders smollm2-135m | tail -1)
mkdir -p "$OUT"; rm -f "$OUT/kvpress.jsonl" "$OUT/records.jsonl"
.venv/bin/python scripts/kvpress_side_by_side.py ids "$OUT/ids.json" --context "$CONTEXT" \
  --continuation "$CONTINUATION" --samples "$SAMPLES" --tokenizer "$VENV/tokenizer"
"$VENV/bin/python" scripts/kvpress_side_by_side.py kvpress "$OUT/ids.json" "$GGUF" "$OUT/kvpress.jsonl" --ratios 0.5 0.75 \
  --tokenizer "$VENV/tokenizer"
# KVzip's scores on both sides (kvpress's scoring the whole context), the first 512 prompt tokens
"$VENV/bin/python" scripts/kvpress_side_by_side.py kvzip-scores "$OUT/ids.json" "$VENV/kvzip_scores.pt" --gguf "$GGUF" \
  --tokenizer "$VENV/tokenizer"
.venv/bin/python scripts/kvpress_side_by_side.py kvzip-scores "$OUT/ids.json" - --against "$VENV/kvzip_scores.pt" \
  | tail -1 > "$OUT/kvzip_scores.json"
kvc() { .venv/bin/kvc "$@" eval.context="$CONTEXT" eval.continuation="$CONTINUATION" eval.samples="$SAMPLES" \
  results_dir="$OUT" publish=true progress=false; }
kvc experiment=eviction_policies policy=none
kvc -m experiment=eviction_policies policy.budget=0.5,0.25 \
  policy=streaming,snapkv,tova,knorm,expected_attention,keydiff,random,pyramid,kvzip,kvcompose
kvc -m experiment=eviction_policies policy.budget=0.5,0.25 policy=adakv policy/scorer=expected_attention
# kvpress's ChunkKV: chunks of 20 over its SnapKV, as many whole chunks as the kept fraction of them
kvc -m experiment=eviction_policies policy.budget=0.5,0.25 policy=chunkkv policy.whole_chunks=true policy.chunk=20 \
  policy.recent=64 policy.scorer.window=64 policy.scorer.kernel=5 policy.scorer.pooling=avg
kvc -m experiment=eviction_policies policy.budget=0.5,0.25 policy=criticalkv policy/scorer=snapkv policy.recent=32
# kvpress's scorer presses keep each KV head's own tokens, and its SnapKV observes 64 queries, average-pooled over 5
kvc -m experiment=eviction_policies policy.budget=0.5,0.25 policy=knorm,keydiff,expected_attention,random \
  policy.per_head=true
kvc -m experiment=eviction_policies policy.budget=0.5,0.25 policy=snapkv,pyramid policy.per_head=true \
  policy.window=64 policy.kernel=5 policy.pooling=avg
# kvpress's KVCompose scores by the max attention of the prompt fed again (bare), averaged over a KV head's query
# heads, unnormalised: our KVzip scorer
kvc -m experiment=eviction_policies policy.budget=0.5,0.25 policy=kvcompose policy/scorer=kvzip \
  +policy.scorer.repeat=null policy.scorer.group=mean policy.normalize=none
.venv/bin/kvc-report --table "$OUT"
