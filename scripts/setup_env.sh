#!/usr/bin/env bash
# Creates .venv (or $VENV) with torch and dpo_lightning[$EXTRAS] (default test,gguf,lora; the demo needs only
# gguf); sourced by demo.sh and test.sh.
# CPU-only machines get torch's CPU build (torch==2.13.0); machines with an NVIDIA driver get the default build.
set -euo pipefail
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install --quiet torch
  else
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$PY" -m pip install --quiet -e ".[${EXTRAS:-test,gguf,lora}]"
export PY
