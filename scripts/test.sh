#!/usr/bin/env bash
# Install (CPU) and run the default test suite: offline, CPU-only. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. .venv/bin/activate
python -m pytest -q "$@"
