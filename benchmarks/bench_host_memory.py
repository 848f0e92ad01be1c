"""What reusing freed host memory (``training/host_memory.py``) buys a CPU training step.

    python benchmarks/bench_host_memory.py --model models/SmolLM2-135M-Instruct --runs 3

Each run starts two fresh processes, one with glibc's defaults and one with ``keep_freed_memory()``, in turn. Each
process runs the prefix-shared log-prob pass forward and backward on 4 micro-batches of 2 generated real-length
pairs (``synthetic.py``, about 560 tokens a pair), after one untimed micro-batch and optimizer step, then one
fused AdamW step. It prints the time per micro-batch, the system time and page faults per micro-batch, and the
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from synthetic import generate  # benchmarks/synthetic.py


def measure(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.model.prefix_sharing import shared_prefix_logps
    from dpo_lightning.training.host_memory import keep_freed_memory

    if args.keep:
        keep_freed_memory()
    dm = PreferenceDataModule(train_path=args.pairs, tokenizer_name_or_path=args.model, batch_size=2,
                              max_length=1024, max_prompt_length=512, cache_dir=None)
    dm.setup("fit")
    batches = [b for _, b in zip(range(5), dm.train_dataloader())]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)

    def step(batch):
        out = shared_prefix_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                  token_stats=True)
        out.logps.sum().backward()

    step(batches[0])
    optimizer.step()
    optimizer.zero_grad()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    optimizer.step()
    optimizer.zero_grad()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    n = len(batches) - 1
    return {"seconds": seconds / n, "system": (after.ru_stime - before.ru_stime) / n,
            "faults": (after.ru_minflt - before.ru_minflt) / n, "peak_rss_gb": after.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/dpo_bench")
    parser.add_argument("--pairs", help="internal: the pairs file")
    parser.add_argument("--keep", action="store_true", help="internal: apply keep_freed_memory()")
    args = parser.parse_args()
    if args.pairs:
        print("RESULT " + json.dumps(measure(args)))
        return
    os.makedirs(args.workdir, exist_ok=True)
    pairs = os.path.join(args.workdir, "host_memory_pairs.jsonl")
    if not os.path.exists(pairs):
        generate(pairs, 16, question_words=(100, 140), answer_words=(170, 230))
    print(f"{'run':>3s} {'setting':8s} {'s/micro-batch':>13s} {'system s':>9s} {'faults':>9s} {'peak GB':>8s}")
    for run in range(args.runs):
        times = {}
        for keep in (False, True):
            command = [sys.executable, __file__, "--model", args.model, "--pairs", pairs] + (["--keep"] if keep else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
            times[keep] = r["seconds"]
            print(f"{run:3d} {'keep' if keep else 'default':8s} {r['seconds']:13.2f} {r['system']:9.2f} "
                  f"{r['faults']:9.0f} {r['peak_rss_gb']:8.2f}")
        print(f"    keep / default: {times[True] / times[False]:.2f}x")


if __name__ == "__main__":
    main()
