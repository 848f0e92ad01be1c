"""A causal-LM forward+backward on CPU in fp32 and under bf16 autocast, with the CPU's own instructions and with
them capped as on CPUs without bf16 instructions (oneDNN's ``ONEDNN_MAX_CPU_ISA``, MKL's
``MKL_ENABLE_INSTRUCTIONS``, ATen's ``ATEN_CPU_CAPABILITY``). Why the demo trains in bf16 only where the CPU has
bf16 instructions (``scripts/demo.sh``).

    python benchmarks/bench_cpu_precision.py --model models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

CAPS = {  # label -> environment
    "this CPU": {},
    "AVX-512 without BF16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "AVX2 only": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def measure(model_path: str, rows: int, tokens: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of one forward+backward, after a warm-up, in fp32 and under bf16 autocast."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens))
    out = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad()
            times.append(time.perf_counter() - start)
        out[label] = min(times[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--rows", type=int, default=8, help="sequences per batch (4 pairs)")
    parser.add_argument("--tokens", type=int, default=110, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a child process: one measurement
    args = parser.parse_args()
    if args.only:
        times = measure(args.model, args.rows, args.tokens, args.repeats)
        print(f"{times['fp32']} {times['bf16']}")
        return
    print(f"forward+backward, {args.rows} x {args.tokens} tokens, best of {args.repeats}, {os.cpu_count()} cores")
    for label, env in CAPS.items():  # each in its own process: the caps are read when the libraries load
        result = subprocess.run([sys.executable, __file__, "--model", args.model, "--rows", str(args.rows),
                                 "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--only", "1"],
                                env={**os.environ, **env}, capture_output=True, text=True, check=True)
        fp32, bf16 = map(float, result.stdout.split()[-2:])
        print(f"{label:22s} fp32 {fp32:7.2f} s   bf16 autocast {bf16:7.2f} s   bf16/fp32 time {bf16 / fp32:5.2f}x")


if __name__ == "__main__":
    main()
