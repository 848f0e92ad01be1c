#!/usr/bin/env bash
# On-policy rounds, offline, on SmolLM2-135M-Instruct: three rounds of `iterate`, then one round on the same 192
# prompts from the initial model, and the held-out figures of both, round by round, with the two last rounds
# compared prompt by prompt on one reward term (scripts/iterate_report.py). Rerunning continues where a killed run
# stopped.
#   bash scripts/iterate_demo.sh                                          # configs/iterate_words.yaml, term used
#   bash scripts/iterate_demo.sh configs/iterate_arithmetic.yaml right    # the arithmetic task
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/iterate_words.yaml}
TERM_NAME=${2:-used}
EXTRAS=gguf source scripts/setup_env.sh
"$PY" -m dpo_lightning fetch-smollm2 --output_dir models/SmolLM2-135M-Instruct
out=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$CONFIG")
start=$SECONDS
"$PY" -m dpo_lightning iterate --config "$CONFIG"
rounds=$((SECONDS - start))
"$PY" -m dpo_lightning iterate --config "$CONFIG" --rounds 1 --prompts_per_round 192 --output_dir "${out}_one_round"
"$PY" scripts/iterate_report.py "$out" "${out}_one_round" --paired "$TERM_NAME"
echo "Wall time: three rounds ${rounds} s, one round $((SECONDS - start - rounds)) s"
