#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh, downloaded into .whl/ on a machine with a package index: the packages the
# check needs beyond torch, lightning, transformers and peft (which the GPU machine is expected to have), for
# CPython 3.12 on x86-64 Linux. Usage: bash benchmarks/gpu_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 typeshed-client==2.15.0 \
  docstring-parser==0.18.0
ls -1 .whl
