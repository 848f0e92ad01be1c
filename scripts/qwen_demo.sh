#!/usr/bin/env bash
# The tutorial's experiment on a Qwen2.5 0.5B instruct model: ask it who it is, reject its own answers, choose answers
# naming "Deep Qwen" (configs/pairs/qwen_identity.yaml; the tutorial's name replacement kept too few pairs on
# Qwen2.5-Coder-0.5B-Instruct, which rarely names itself), train, compare. Two trainings on the same pairs:
#   shipped   configs/qwen_identity.yaml: [sigmoid, sft] (0.2, 1), beta 0.5, lr 1e-5, anchors, 3 epochs
#   tutorial  the tutorial's own hyperparameters: DPO only, beta 0.2, lr 5e-5, 1 epoch, no warmup; probes every
#             VAL_EVERY batches with the collapse guard on, so it stops when the answers degenerate or drift
# Each is compared with the base on the two reporting splits (SPLITS) under four system prompts.
#
#   [SPLITS='report fresh'] [VAL_EVERY=24] bash scripts/qwen_demo.sh [MODEL] [EXTRA FIT ARGS...]
# MODEL: a local folder or hub id (default Qwen/Qwen2.5-0.5B-Instruct). Offline, Qwen2.5-Coder-0.5B-Instruct comes
# from PyPI wheels: see "What about Qwen?" in docs/identity.md, which has the figures and times. On two 2-core CPUs
# with AVX512-BF16 the shipped fit took 18 and 26 min and a compare on one split 7 and 14 min, so the script runs
# for one to two hours; full fine-tuning peaked at 17.5 GB of memory. With less memory pass
# `--model.lora.use_peft true --model.optimizer.lr 2e-4` (not measured).
# The tutorial's fit has no model to compare when the guard stopped it before any probe pass passed.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}
shift || true
VAL_EVERY=${VAL_EVERY:-24}  # training batches between probe passes of the tutorial run (12 steps of 4 x 2)
EXTRAS=${EXTRAS:-lora} source scripts/setup_env.sh
precision=32-true
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then precision=bf16-mixed
elif grep -qwE 'avx512_bf16|amx_bf16|bf16' /proc/cpuinfo 2>/dev/null; then precision=bf16-mixed; fi
echo "[qwen demo] model $MODEL, precision $precision"
start=$SECONDS
"$PY" -m dpo_lightning build-pairs --config configs/pairs/qwen_identity.yaml --model_name_or_path "$MODEL" \
  --dtype "$([ "$precision" = bf16-mixed ] && echo bfloat16 || echo float32)"
echo "[qwen demo] build-pairs: $((SECONDS - start)) s"

# the reporting splits each trained model is compared with the base on, with the reporting general prompts for the
# drift; the second run reuses the first one's base answers
SPLITS=${SPLITS:-report fresh}
declare -A base_answers=()
run() {  # run NAME FIT-ARGS...: fit, then compare on each split; the run directory goes to NAME.dir
  local name=$1 begin=$SECONDS
  shift
  "$PY" -m dpo_lightning fit --config configs/qwen_identity.yaml --model.model_name_or_path "$MODEL" \
    --trainer.precision "$precision" "$@" || echo "[qwen demo] $name: fit stopped (see the message above)"
  local dir
  dir=$(ls -td lightning_logs/version_* | head -n 1)
  echo "$dir" > "lightning_logs/qwen_$name.dir"
  echo "[qwen demo] $name: fit $((SECONDS - begin)) s, $dir"
  local trained="$dir/hf_model"
  if [ ! -d "$trained" ] && [ -f "$dir/checkpoints/last_good.ckpt" ]; then  # the guard stopped it: its last good
    "$PY" -m dpo_lightning export --ckpt_path "$dir/checkpoints/last_good.ckpt" --output_dir "$dir/hf_model_good"
    trained="$dir/hf_model_good"
  fi
  [ -d "$trained" ] || return 0
  local split out reuse
  for split in $SPLITS; do
    out="$dir/compare_$split.json"
    reuse=()
    if [ -n "${base_answers[$split]:-}" ]; then reuse=(--base_answers_path "${base_answers[$split]}"); fi
    "$PY" -m dpo_lightning compare --run_dir "$dir" --trained "$trained" "${reuse[@]}" \
      --prompts_path "data/identity/prompts_$split.jsonl" --general_path data/identity/general_report.jsonl \
      --show_answers false --output_path "$out"
    base_answers[$split]=$out
  done
  echo "[qwen demo] $name: fit and compare $((SECONDS - begin)) s"
}

run shipped --trainer.limit_val_batches 0 "$@"
run tutorial --model.loss.loss_type sigmoid --model.loss.loss_weights null --model.loss.beta 0.2 \
  --model.optimizer.lr 5e-5 --model.scheduler.warmup_ratio 0 --trainer.max_epochs 1 \
  --trainer.val_check_interval "$VAL_EVERY" --probes.max_prompts 16 \
  --collapse_guard.max_degenerate_rate 0.25 "$@"
echo "[qwen demo] wall time: $((SECONDS - start)) s"
