#!/usr/bin/env bash
# Set up, then fine-tune the embedded tiny Qwen2.5 on the demo data, merge the adapter, and compare
# the merged model with the base on the validation split.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
kedro run --pipelines sft
kedro run --pipelines merge
kedro run --pipelines evaluate
