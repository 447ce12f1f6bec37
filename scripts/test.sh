#!/usr/bin/env bash
# Set up, then run the whole test suite (end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
ruff check src tests scripts benchmarks
python -m pytest "$@"
