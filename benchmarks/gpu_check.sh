#!/usr/bin/env bash
# The GPU check: one command on a machine with one CUDA GPU and no network, about 6 minutes. It prints
#   1. the machine: GPU, driver-side CUDA, torch, lightning, transformers, peft;
#   2. the GPU-marked tests (pytest -m gpu): bf16-true and bf16-mixed fits, prefix sharing and packing equal to the
#      plain layout under SDPA on CUDA, packing under FlexAttention's block masks, the LM head that keeps no
#      logits under bf16 autocast, FSDP on one GPU with its export, the fused AdamW step;
#   3. the side-by-side benchmark against TRL (benchmarks/bench_vs_trl.py --preset long, max_length 2048) on
#      randomly initialised models of Qwen2.5-0.5B and Qwen2.5-1.5B shape: pairs/s, tokens/s, MFU, max allocated
#      memory (no weights, no tokenizer download: benchmarks/synthetic.py).
# torch, lightning, transformers and peft must be installed; trl, datasets, jsonargparse and their small
# dependencies are taken from wheels in .whl/ when present (benchmarks/gpu_wheels.sh fetches them elsewhere).
#   bash benchmarks/gpu_check.sh [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dpo_site .whl/*.whl
  export PYTHONPATH=/tmp/dpo_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0

echo "== machine"
"$PY" - <<'EOF' || status=1
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"capability {p.major}.{p.minor}")
for name in ("lightning", "transformers", "peft", "trl", "datasets", "jsonargparse"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001 - report and go on
        print(name, "missing:", error)
EOF

echo "== GPU-marked tests"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests -rs || status=1

echo "== benchmark against TRL, random Qwen2.5 shapes, max_length 2048"
timeout 150 "$PY" benchmarks/bench_vs_trl.py --preset long --model random:qwen2.5-0.5b --steps 4 \
  --sides ours,ours+gc,trl,ceiling --workdir /tmp/dpo_bench || status=1
timeout 120 "$PY" benchmarks/bench_vs_trl.py --preset long --model random:qwen2.5-1.5b --steps 4 \
  --sides ours,trl --workdir /tmp/dpo_bench || status=1
echo "== gpu_check exit status $status"
exit $status
