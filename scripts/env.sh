# Sourced by the scripts: nothing reaches for the network unless asked.
export KEDRO_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=1
export HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-true}"
export PATH="$(pwd)/${QWEN_PIPELINE_VENV:-.venv}/bin:$PATH"
