#!/usr/bin/env bash
# Create .venv and install the project for CPU (exact pins from constraints-cpu.txt).
# Idempotent: skips the install when pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QWEN_PIPELINE_VENV:-.venv}"
STAMP="$VENV/.installed-$(cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "Installing into $VENV (a few minutes, log in $VENV/install.log)..."
  python3 -m venv "$VENV"
  if ! "$VENV/bin/pip" install --disable-pip-version-check -c constraints-cpu.txt -e ".[dev]" \
      > "$VENV/install.log" 2>&1; then
    tail -n 40 "$VENV/install.log"
    echo "pip install failed; full log in $VENV/install.log" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
