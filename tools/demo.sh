#!/usr/bin/env bash
# Install (if needed), build a tiny random-weight SD1 model and a few images, and train a LoRA on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python -m tools.demo "$@"
