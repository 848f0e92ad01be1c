#!/usr/bin/env bash
# The test command (the README's and CI's): set up the environment, lint, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
"$PY" -m ruff check dpo_lightning tests benchmarks
"$PY" -m pytest -q "$@"
