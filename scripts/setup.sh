#!/usr/bin/env bash
# Sets up .venv/ with kvcompress and its dependencies, and fetches the default model (SmolLM2-135M GGUF,
# sha256-checked). Idempotent: re-running after a pyproject.toml change reinstalls, otherwise it is quick.
#   KVC_TORCH   torch requirement to install first (default torch==2.13.0; e.g. "torch" for a CUDA build)
#   PYTHON      interpreter for the venv (default python3, >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
stamp=.venv/.kvcompress-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "${KVC_TORCH:-torch==2.13.0}"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
.venv/bin/python -m kvcompress.engine.loaders smollm2-135m >/dev/null
