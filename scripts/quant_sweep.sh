#!/usr/bin/env bash
# The quantization table (results/quant/README.md): perplexity sweeps, then decode speed at 2k context.
#   scripts/quant_sweep.sh [ppl|speed] [kvc overrides...]      (no part: both)
#   kvc-report --table results/quant                             (the table, from results/quant/records.jsonl)
# Overrides go to every kvc call, e.g. `scripts/quant_sweep.sh speed device=cpu`.
set -euo pipefail
KVC=${KVC:-kvc}
part=all
if [[ ${1:-} == ppl || ${1:-} == speed ]]; then part=$1; shift; fi
if [[ $part != speed ]]; then
  for e in quant_sweep quant_int4 quant_int2 quant_kivi; do
    $KVC -m experiment=$e progress=false publish=true "$@"
  done
fi
if [[ $part != ppl ]]; then
  $KVC -m experiment=quant_speed progress=false publish=true "$@"
  # the same with a dequantized copy kept beside the codes (decode without dequantizing the history)
  $KVC -m experiment=quant_speed storage=int4,kivi "storage.dequant_cache=choice(true)" progress=false publish=true "$@"
fi
