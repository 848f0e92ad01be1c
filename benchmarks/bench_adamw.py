"""One AdamW step over a model's parameters: torch's default (on CPU a loop of single-tensor ops), foreach, and
the fused kernel that ``dpo_lightning.training.optim.AdamW`` takes by default.

    python benchmarks/bench_adamw.py --model models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant, after one warm-up step")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = list(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for label, options in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-6, **options)
        optimizer.step()  # warm-up: allocates the moments
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{label:8s} {(time.perf_counter() - start) / args.steps:.3f} s/step "
              f"({sum(p.numel() for p in params) / 1e6:.0f}M parameters, {device})")
        del optimizer


if __name__ == "__main__":
    main()
