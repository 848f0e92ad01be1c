"""dpo_lightning vs TRL's DPOTrainer, same model, pairs and batch settings, in one run.

    python benchmarks/bench_vs_trl.py --model models/SmolLM2-135M-Instruct --pairs data/demo/identity_pairs.jsonl

Each side runs in its own process (clean peak RSS): ``ours`` (DPOModule under a Lightning Trainer), ``trl``
(DPOTrainer, its defaults but fp32 and no reporting) and ``plain`` (a causal-LM forward+backward over the same
chosen+rejected tokens, the ceiling for a DPO step). Options follow the side after ``+``: ``pre`` precomputed
reference log-probs (ours and TRL; the pass is before the first step and timed separately), ``lora`` LoRA r=16
alpha=32 on every linear layer (ours and TRL), and for ours ``share`` (prefix sharing), ``group`` (length-grouped
batches), ``compile`` (torch.compile of the decoder layers). The first optimizer step is warm-up and not timed.
Prints pairs/s, real (non-pad) tokens/s, peak memory (RSS on CPU, max allocated on GPU), our padding share and
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def batches(args, group_by_length: bool = False):
    """The tokenized pairs, in one fixed order, grouped into optimizer steps of batch x accumulation pairs."""
    from dpo_lightning.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(train_path=args.pairs, tokenizer_name_or_path=args.model, batch_size=args.batch_size,
                              max_length=args.max_length, max_prompt_length=args.max_length // 2, cache_dir=None,
                              group_by_length=group_by_length)
    dm.setup("fit")
    return dm


def padding_share(dm) -> float:
    from dpo_lightning.data.sampling import padding_fraction

    columns = [[len(p[k]) for p in dm.train_pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return padding_fraction(list(dm.train_sampler), *columns, dm.hparams.batch_size)


def run_ours(args) -> dict:
    from lightning.pytorch import Callback, Trainer

    from dpo_lightning.training.module import DPOModule
    from dpo_lightning.training.settings import CompileSettings, LoraSettings, ReferenceSettings

    options = set(args.options)
    dm = batches(args, group_by_length="group" in options)
    times, started = [], []

    class Clock(Callback):
        def on_train_start(self, trainer, pl_module):
            started.append(time.perf_counter())  # after configure_model: the precompute pass is done

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            times.append(time.perf_counter())

    started.append(time.perf_counter())
    model = DPOModule(args.model, reference=ReferenceSettings(precompute_ref_log_probs="pre" in options),
                      prefix_sharing="share" in options, lora=LoraSettings(use_peft="lora" in options),
                      compile=CompileSettings(torch_compile="compile" in options))  # every option explicit
    trainer = Trainer(accelerator="auto", max_steps=args.steps + 1, accumulate_grad_batches=args.accumulation,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[Clock()], limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    tokens = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in dm.train_pairs)
    return {"seconds": times[-1] - times[0], "pairs": args.steps * args.batch_size * args.accumulation,
            "tokens_per_pair": tokens / len(dm.train_pairs), "padding": padding_share(dm),
            "setup_seconds": started[-1] - started[0]}


def run_trl(args) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    times, started = [], [time.perf_counter()]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            started.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    rows = [json.loads(line) for line in open(args.pairs)]
    config = trl.DPOConfig(output_dir="/tmp/bench_trl", per_device_train_batch_size=args.batch_size,
                           gradient_accumulation_steps=args.accumulation, max_steps=args.steps + 1,
                           max_length=args.max_length, bf16=False, report_to="none", logging_steps=1000,
                           save_strategy="no", use_cpu=not torch.cuda.is_available(),
                           precompute_ref_log_probs="pre" in args.options)
    peft_config = None
    if "lora" in args.options:
        import peft

        peft_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                      task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                             args=config, processing_class=AutoTokenizer.from_pretrained(args.model),
                             train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()],
                             peft_config=peft_config)
    trainer.train()
    return {"seconds": times[-1] - times[0], "pairs": args.steps * args.batch_size * args.accumulation,
            "setup_seconds": started[-1] - started[0]}


def run_plain(args) -> dict:
    from transformers import AutoModelForCausalLM

    dm = batches(args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # as TRL (adamw_torch_fused) and ours
    loader = iter(dm.train_dataloader())
    stamps = []
    for _ in range(args.steps + 1):
        for _ in range(args.accumulation):
            try:
                batch = next(loader)
            except StopIteration:
                loader = iter(dm.train_dataloader())
                batch = next(loader)
            labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    return {"seconds": stamps[-1] - stamps[0], "pairs": args.steps * args.batch_size * args.accumulation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--pairs", default="data/demo/identity_pairs.jsonl")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--sides", default="ours,trl,ours+pre,trl+pre,plain",
                        help="what to run, in order: ours, trl, plain, each with +options (see above), e.g. "
                             "ours+pre+share,trl+lora")
    parser.add_argument("--side", help="internal: run one side and print JSON")
    parser.add_argument("--options", default="", help="internal: the side's options, '+'-separated")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.options = [o for o in args.options.split("+") if o]
    if args.side:
        result = {"ours": run_ours, "trl": run_trl, "plain": run_plain}[args.side](args)
        result["peak_memory_gb"] = peak_memory_gb()
        print("RESULT " + json.dumps(result))
        return
    results = {}
    base = [f"--{k}={getattr(args, k)}" for k in ("model", "pairs", "batch_size", "accumulation", "max_length",
                                                  "steps")]
    for label in args.sides.split(","):
        side, _, options = label.partition("+")
        command = [sys.executable, __file__, *base, "--side", side, "--options", options]
        proc = subprocess.run(command, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[label] = json.loads(line[0][len("RESULT "):])
    tokens_per_pair = next(r["tokens_per_pair"] for r in results.values() if "tokens_per_pair" in r)
    print(f"model {args.model}, batch {args.batch_size} x accumulation {args.accumulation}, max_length "
          f"{args.max_length}, {args.steps} timed steps, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    width = max(9, *(len(label) for label in results))
    print(f"{'side':{width}s} {'pairs/s':>8s} {'tokens/s':>9s} {'peak GB':>8s} {'padding':>8s} {'setup s':>8s}")
    for label, r in results.items():
        r["pairs_per_s"] = r["pairs"] / r["seconds"]
        padding = f"{r['padding']:8.1%}" if "padding" in r else f"{'':8s}"
        setup = f"{r['setup_seconds']:8.1f}" if "setup_seconds" in r else f"{'':8s}"
        print(f"{label:{width}s} {r['pairs_per_s']:8.3f} {r['pairs_per_s'] * tokens_per_pair:9.1f} "
              f"{r['peak_memory_gb']:8.2f} {padding} {setup}")
    anchors = [label for label in results if label.startswith("trl")]
    for label in (label for label in results if label.startswith("ours")):
        for anchor in anchors:
            a, b = results[label], results[anchor]
            print(f"{label}/{anchor}: speed {a['pairs_per_s'] / b['pairs_per_s']:.2f}x, "
                  f"memory {a['peak_memory_gb'] / b['peak_memory_gb']:.2f}x")
        if "plain" in results:
            print(f"{label}/plain forward+backward: speed "
                  f"{results[label]['pairs_per_s'] / results['plain']['pairs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
