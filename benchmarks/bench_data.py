"""Data preparation at scale: dpo_lightning's data module against TRL's DPOTrainer, same pairs, same tokenizer.

    python benchmarks/bench_data.py --model models/SmolLM2-135M-Instruct --pairs 10000 100000 --num_proc 1 2

Generates conversational pairs of realistic length (a system prompt, a ~120-word question, two ~180-word answers;
deterministic, written once per size under ``--workdir``), then for each size, ``num_proc`` and side runs a fresh
process twice: ``cold`` (empty caches: read, tokenize, cache) and ``warm`` (the caches of the cold run). Each
process times everything from loading the tokenizer to the first training batch, then draws ``--batches`` more
batches, and reports its peak RSS (``ru_maxrss``: it includes the pages of memory-mapped files the process touched)
and its peak anonymous RSS (memory it allocated itself, sampled every 20 ms). ``ours`` is
``PreferenceDataModule.prepare_data()`` + ``setup("fit")`` + ``train_dataloader()``; ``trl`` is
``load_dataset("json")`` + ``DPOTrainer(...)`` (a 1-layer random model with the same tokenizer; the model is built
before the clock starts) + ``get_train_dataloader()``. Both use max_length 1024 and batch size 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

from synthetic import generate  # benchmarks/synthetic.py


def draw(loader, start: float, batches: int) -> float:
    """Seconds from ``start`` to ``loader``'s first batch; then ``batches`` more are drawn (not timed)."""
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    for _ in range(batches):
        next(it)
    return first


def run_ours(args) -> dict:
    from dpo_lightning.data.datamodule import PreferenceDataModule

    start = time.perf_counter()
    dm = PreferenceDataModule(train_path=args.data, tokenizer_name_or_path=args.model, batch_size=2,
                              max_length=1024, max_prompt_length=512, cache_dir=args.cache, num_proc=args.num_proc)
    dm.prepare_data()
    dm.setup("fit")
    return {"first_batch_s": draw(dm.train_dataloader(), start, args.batches), "pairs": len(dm.train_pairs)}


def run_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = load_dataset("json", data_files=args.data, split="train", cache_dir=args.cache)
    config = DPOConfig(output_dir=os.path.join(args.cache, "out"), per_device_train_batch_size=2, max_length=1024,
                       dataset_num_proc=args.num_proc if args.num_proc > 1 else None, report_to=[], use_cpu=True,
                       bf16=False)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=config, train_dataset=data,
                         processing_class=tok)
    return {"first_batch_s": draw(trainer.get_train_dataloader(), start, args.batches),
            "pairs": len(trainer.train_dataset)}


class AnonymousPeak(threading.Thread):
    """Samples the process's anonymous resident memory (``RssAnon``: what it allocated, not the file pages it
    maps) every 20 ms and keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kb = 0

    def run(self) -> None:
        while True:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            time.sleep(0.02)


def child(args) -> None:
    sampler = AnonymousPeak()
    sampler.start()
    result = (run_ours if args.side == "ours" else run_trl)(args)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["peak_anon_gb"] = sampler.peak_kb / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def measure(args, side: str, n: int, num_proc: int, data: str, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--model", args.model, "--data", data, "--cache", cache,
           "--num_proc", str(num_proc), "--batches", str(args.batches)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="tokenizer (a local model folder)")
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    parser.add_argument("--batches", type=int, default=50, help="batches drawn after the first")
    parser.add_argument("--workdir", default="/tmp/dpo_lightning_bench_data")
    parser.add_argument("--keep", action="store_true", help="keep the caches of the last run")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.side, args.num_proc = args.child, args.num_proc[0]
        return child(args)
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for n in args.pairs:
        data = os.path.join(args.workdir, f"pairs-{n}.jsonl")
        if not os.path.exists(data):
            generate(data, n)
        for num_proc in args.num_proc:
            for side in args.sides:
                cache = os.path.join(args.workdir, f"cache-{side}-{n}-{num_proc}")
                shutil.rmtree(cache, ignore_errors=True)
                cold = measure(args, side, n, num_proc, data, cache)
                warm = measure(args, side, n, num_proc, data, cache)
                if not args.keep:
                    shutil.rmtree(cache, ignore_errors=True)
                row = {"pairs": n, "num_proc": num_proc, "side": side, "cold_s": round(cold["first_batch_s"], 1),
                       "warm_s": round(warm["first_batch_s"], 2), "cold_rss_gb": round(cold["peak_rss_gb"], 2),
                       "warm_rss_gb": round(warm["peak_rss_gb"], 2), "cold_anon_gb": round(cold["peak_anon_gb"], 2),
                       "warm_anon_gb": round(warm["peak_anon_gb"], 2), "kept": cold["pairs"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| pairs | num_proc | side | cold to first batch (s) | warm (s) | peak RSS cold / warm (GB) | "
          "peak anonymous RSS cold / warm (GB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs']:,} | {r['num_proc']} | {r['side']} | {r['cold_s']} | {r['warm_s']} | "
              f"{r['cold_rss_gb']} / {r['warm_rss_gb']} | {r['cold_anon_gb']} / {r['warm_anon_gb']} |")
    for n in args.pairs:
        for num_proc in args.num_proc:
            by = {r["side"]: r for r in rows if r["pairs"] == n and r["num_proc"] == num_proc}
            if len(by) == 2:
                ours, trl = by["ours"], by["trl"]
                print(f"{n:,} pairs, num_proc {num_proc}: cold ours/TRL {ours['cold_s'] / trl['cold_s']:.2f}x, "
                      f"warm ours/TRL {ours['warm_s'] / trl['warm_s']:.2f}x")


if __name__ == "__main__":
    main()
