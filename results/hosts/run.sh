#!/usr/bin/env bash
# How far the host moves a number: the full cache and int4 (groups of 32) on SmolLM2-135M (WikiText-2, 4 windows of
# 256 tokens, chunk 16, fp32) on two simulated machines: AVX2 with 2 threads, and the scalar/SSE4.2 paths
# (ATEN_CPU_CAPABILITY=default for torch's own kernels, MKL_ENABLE_INSTRUCTIONS=SSE4_2 for its matmuls) with 1.
# Every record names its host (cpu, isa, threads); `kvc-report --table results/hosts` writes README.md from them.
set -euo pipefail
cd "$(dirname "$0")/../.."
EVAL=(eval.window=256 eval.max_windows=4 eval.chunk=16 eval.bootstrap=0 progress=false)
CACHES=("storage=dense" "storage=int4 storage.group_size=32")
for host in "avx2 2" "default 1"; do
  read -r isa threads <<< "$host"
  mkl=$([ "$isa" = avx2 ] && echo AVX2 || echo SSE4_2)
  for cache in "${CACHES[@]}"; do
    # shellcheck disable=SC2086
    ATEN_CPU_CAPABILITY=$isa MKL_ENABLE_INSTRUCTIONS=$mkl OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads \
      .venv/bin/kvc $cache "${EVAL[@]}" results_dir=results/hosts/runs \
        hydra.run.dir="outputs/hosts/$isa-$threads/${cache//[ =.]/_}"
  done
done
.venv/bin/kvc-report --table results/hosts
