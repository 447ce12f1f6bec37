#!/usr/bin/env bash
# Set up, then fine-tune the embedded tiny Qwen2.5 on the demo data and merge the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
kedro run --pipelines sft
kedro run --pipelines merge
