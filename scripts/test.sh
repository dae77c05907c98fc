#!/usr/bin/env bash
# Install (CPU) and run the default test suite: offline, CPU-only. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
# the OCR reward's test reads text with tesseract (Debian: tesseract-ocr); without it that test skips
if ! command -v tesseract >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq tesseract-ocr) >/dev/null 2>&1 || echo "note: could not install tesseract-ocr; its test will skip" >&2
fi
. .venv/bin/activate
python -m pytest -q "$@"
