#!/usr/bin/env bash
# On-policy rounds, offline, on SmolLM2-135M-Instruct: three rounds of `iterate` (configs/iterate_arithmetic.yaml),
# then one round on the same 192 prompts (the same pair budget and optimizer steps), and the held-out figures of
# both, round by round, with the two last rounds compared prompt by prompt (scripts/iterate_report.py). Rerunning
# continues where a killed run stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=gguf source scripts/setup_env.sh
"$PY" -m dpo_lightning fetch-smollm2 --output_dir models/SmolLM2-135M-Instruct
start=$SECONDS
"$PY" -m dpo_lightning iterate --config configs/iterate_arithmetic.yaml
rounds=$((SECONDS - start))
"$PY" -m dpo_lightning iterate --config configs/iterate_arithmetic.yaml --rounds 1 --prompts_per_round 192 \
  --output_dir lightning_logs/iterate_arithmetic_one_round
"$PY" scripts/iterate_report.py lightning_logs/iterate_arithmetic lightning_logs/iterate_arithmetic_one_round \
  --paired right
echo "Wall time: three rounds ${rounds} s, one round $((SECONDS - start - rounds)) s"
