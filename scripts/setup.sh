#!/usr/bin/env bash
# Create .venv and install the project for CPU (exact pins from constraints-cpu.txt).
# Idempotent: skips the install when pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QWEN_PIPELINE_VENV:-.venv}"
STAMP="$VENV/.installed-$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --disable-pip-version-check -q -c constraints-cpu.txt -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
