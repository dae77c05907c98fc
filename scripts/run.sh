#!/usr/bin/env bash
# Install (CPU unless a GPU is present) and run the main job: the whole toy-world
# pipeline (teachers, GRPO-Mix, cold starts, OPD, evaluation, report).
# Extra arguments go to `flowopd run`, e.g. --preset quick --out runs/quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
flowopd run "$@"
