#!/usr/bin/env bash
# Install (CPU unless a GPU is present) and run the main toy-world job:
# sample a few prompts with the shipped base and evaluate it on the test split.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
out="${1:-runs/demo}"
mkdir -p "$out"
printf '%s\n' 'a red square and a blue circle' 'three triangles' 'a circle left of a square' 'a sign that says "K7"' > "$out/prompts.txt"
flowopd sample --checkpoint base --prompts "$out/prompts.txt" --out "$out/samples"
flowopd eval --checkpoint base --out "$out/eval-base"
