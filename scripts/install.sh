#!/usr/bin/env bash
# Set up .venv with flowopd and its dependencies. Picks PyTorch's CPU build when
# there is no NVIDIA GPU (a plain `pip install torch` would pull a multi-GB CUDA build).
# Usage: bash scripts/install.sh [EXTRAS]   e.g. EXTRAS=dev or dev,sd3
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.3,<3"
  elif ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-2.13.0+cpu-* >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"          # CPU wheel shipped on this machine
  else
    python -m pip install -q "torch>=2.3,<3" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
python -m pip install -q -e "$spec"
