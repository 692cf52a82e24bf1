#!/usr/bin/env bash
# Create .venv with the CPU build of torch and every runtime + test dependency. Idempotent.
# TORCH_SPEC overrides the torch requirement (e.g. a CUDA build on a GPU machine); PIP_INDEX_URL/PIP_EXTRA_INDEX_URL are honoured by pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Install torch on its own first, so nothing else pulls a multi-GB CUDA build.
  .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/pip install -q -r requirements-test.txt
