"""dpo_lightning vs TRL's DPOTrainer, same model, pairs and batch settings, in one run, with the physical ceiling.

    python benchmarks/bench_vs_trl.py --preset identity    # data/demo/identity_pairs.jsonl, max_length 256
    python benchmarks/bench_vs_trl.py --preset real        # generated pairs, ~150-token questions, ~250-token answers
    python benchmarks/bench_vs_trl.py --preset long --model random:qwen2.5-0.5b   # a GPU's shapes, random weights

Presets (each flag given on the command line wins):

- ``identity``: ``data/demo/identity_pairs.jsonl`` (short identity pairs, prompts half of each pair), max_length
  256, 2 pairs x 4 accumulation.
- ``real``: generated pairs of users' lengths: system prompt + ~150-token question, two ~250-token answers
  (``benchmarks/synthetic.py``), max_length 1024, 2 x 2.
- ``long``: generated pairs of about 350 + 2 x 800 tokens, max_length 2048, 4 x 1.

``--model`` is a local model directory, or ``random:SHAPE`` for random weights of a real model's shape
(``synthetic.SHAPES``: ``qwen2.5-0.5b``, ``qwen2.5-1.5b``, ``tiny``) with a word-level tokenizer (one token a
word): no download.

Each side runs in its own process (clean peak memory). The first optimizer step is warm-up and not timed.

- ``ours``: DPOModule and PreferenceDataModule with the library's defaults (precomputed reference log-probs,
  prefix sharing, length-grouped batches); options after ``+``: ``live`` (reference run each step), ``plain``
  (no prefix sharing), ``nogroup``, ``pack`` (``model.packing``, rows as long as the batch's longest pair),
  ``budget`` (``data.max_tokens``: batches by a token budget of the batch size times the mean pair's tokens, so the
  same pairs per step on average), ``gc`` (gradient checkpointing), ``lora`` (r 16, alpha 32, every linear layer),
  ``compile``.
- ``trl``: DPOTrainer with its defaults (gradient checkpointing on, reference run each step), fp32 weights
  (bf16 autocast on CUDA), no reporting; options ``pre`` (precompute_ref_log_probs, timed separately), ``nogc``,
  ``lora``.
- ``plain``: a causal-LM forward+backward over the two padded rows of each pair, what a DPO step costs without
  its reference and loss.
- ``ceiling``: a causal-LM forward+backward over only each pair's own tokens (one row per pair: prompt once, then
  both responses, plain causal attention), batched as ours in length-grouped order so the rows pad as little as
  ours do: the least work any DPO step on these pairs can do on this hardware, without a reference, a mask or a
  DPO head. On CPU, plain and ceiling reuse freed host memory as ours does (``training/host_memory.py``).

Printed per side: pairs/s; tokens/s (the pairs' own tokens, prompt once, as ``throughput/tokens_per_sec``); peak
memory (RSS on CPU, max allocated on CUDA) and the peak above the floor of fp32 weights + gradients + AdamW states
(16 bytes per trained parameter, 4 per frozen one); on CPU also the peak above that floor and the side's libraries
(the RSS of its process once its imports are done, before data or a model exist: Python, torch, transformers and
Lightning or TRL, memory no trainer setting changes; on CUDA the allocator counts none of it), which leaves the
activations and the trainer's own buffers; ours' padding share (``throughput/padding_share``); set-up time;
on CUDA, MFU: ``6 N`` FLOPs per pair token (the policy's forward and backward) over time and the device's peak,
the same useful work for every side. Then ratios against each TRL side and the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from sides import print_result, run_side  # benchmarks/sides.py
from synthetic import generate, random_model  # benchmarks/synthetic.py

PRESETS = {
    "identity": dict(pairs="data/demo/identity_pairs.jsonl", max_length=256, batch_size=2, accumulation=4),
    "real": dict(pairs="generated:64:100-140:170-230", max_length=1024, batch_size=2, accumulation=2),
    "long": dict(pairs="generated:64:250-320:580-680", max_length=2048, batch_size=4, accumulation=1),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def libraries_gb() -> float:
    """The process's resident memory now: taken after a side's imports, before its data and model exist."""
    if torch.cuda.is_available():
        return 0.0  # max_memory_allocated counts tensors only
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def floor_gb(model: torch.nn.Module) -> float:
    """fp32 weights + gradients + AdamW's two states of the trained parameters, the weights of the frozen ones."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return (16 * trained + 4 * frozen) / 2**30


def data_module(args, **settings):
    from dpo_lightning.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(train_path=args.pairs, tokenizer_name_or_path=args.tokenizer, batch_size=args.batch_size,
                              max_length=args.max_length, max_prompt_length=args.max_length // 2, cache_dir=None,
                              **settings)
    dm.setup("fit")
    return dm


def own_tokens(pair: dict) -> int:
    return len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def run_ours(args) -> dict:
    from lightning.pytorch import Callback, Trainer

    from dpo_lightning.data.datamodule import PreferenceDataModule  # noqa: F401 (imported before the baseline)
    from dpo_lightning.training.module import DPOModule
    from dpo_lightning.training.settings import CompileSettings, LoraSettings, ReferenceSettings
    from dpo_lightning.training.throughput import ThroughputTelemetry

    libraries = libraries_gb()
    options = set(args.options)
    started = [time.perf_counter()]

    class Clock(Callback):
        def on_train_start(self, trainer, pl_module):
            started.append(time.perf_counter())  # after configure_model: the precompute pass is done

    dm = data_module(args, group_by_length="nogroup" not in options)
    if "budget" in options:
        own = sum(dm.train_pairs.lengths(c) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        dm = data_module(args, group_by_length="nogroup" not in options,
                         max_tokens=int(round(args.batch_size * own.mean())))
    lora = LoraSettings(use_peft=True, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0) \
        if "lora" in options else LoraSettings()  # every linear layer but the head, as TRL's all-linear
    model = DPOModule(args.model, reference=ReferenceSettings(precompute_ref_log_probs="live" not in options),
                      prefix_sharing="plain" not in options, packing="pack" in options, lora=lora,
                      gradient_checkpointing="gc" in options,
                      compile=CompileSettings(torch_compile="compile" in options))
    telemetry = ThroughputTelemetry()
    trainer = Trainer(accelerator="auto", devices=1, max_steps=args.steps + 1,
                      accumulate_grad_batches=args.accumulation, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, precision="bf16-mixed" if device() == "cuda" else "32-true",
                      enable_model_summary=False, callbacks=[Clock(), telemetry], limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    timed = telemetry.history[1:]  # the first step is warm-up
    total = {k: sum(s[k] for s in timed) for k in ("step_time", "pairs", "tokens", "filled", "positions")}
    return {"seconds": total["step_time"], "pairs": total["pairs"], "tokens": total["tokens"],
            "padding": 1 - total["filled"] / total["positions"], "setup_seconds": started[-1] - started[0],
            "floor_gb": floor_gb(model.policy), "libraries_gb": libraries,
            "params": sum(p.numel() for p in model.policy.parameters())}


def run_trl(args) -> dict:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    libraries = libraries_gb()
    times, started = [], [time.perf_counter()]

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            started.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    rows = [json.loads(line) for line in open(args.pairs)]
    config = trl.DPOConfig(output_dir=os.path.join(args.workdir, "trl_out"),
                           per_device_train_batch_size=args.batch_size,
                           gradient_accumulation_steps=args.accumulation, max_steps=args.steps + 1,
                           max_length=args.max_length, bf16=device() == "cuda", report_to="none", logging_steps=1000,
                           save_strategy="no", use_cpu=device() == "cpu",
                           precompute_ref_log_probs="pre" in args.options,
                           **({"gradient_checkpointing": False} if "nogc" in args.options else {}))
    peft_config = None
    if "lora" in args.options:
        import peft

        peft_config = peft.LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    trainer = trl.DPOTrainer(model=model, args=config, processing_class=AutoTokenizer.from_pretrained(args.tokenizer),
                             train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()],
                             peft_config=peft_config)
    trainer.train()
    pairs = args.steps * args.batch_size * args.accumulation
    return {"seconds": times[-1] - times[0], "pairs": pairs, "setup_seconds": started[-1] - started[0],
            "floor_gb": floor_gb(trainer.model), "libraries_gb": libraries,
            "gradient_checkpointing": config.gradient_checkpointing}


def causal_lm_steps(args, rows_of) -> dict:
    """Forward+backward of a causal LM over ``rows_of(batch)`` (``(input_ids, attention_mask, labels)`` tuples)
    for each batch of the ours-side order; AdamW (fused, as ours and TRL's default) every ``accumulation``
    batches. Timed from the end of the first optimizer step."""
    from transformers import AutoModelForCausalLM

    from dpo_lightning.data.datamodule import PreferenceDataModule  # noqa: F401 (imported before the baseline)
    from dpo_lightning.training.host_memory import keep_freed_memory

    libraries = libraries_gb()
    if device() == "cpu":
        keep_freed_memory()  # as ours: the ceiling is the least time, so it gets the same host memory reuse
    dm = data_module(args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    loader, stamps = iter(dm.train_dataloader()), []
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device() == "cuda")
    for _ in range(args.steps + 1):
        for _ in range(args.accumulation):
            try:
                batch = next(loader)
            except StopIteration:
                loader = iter(dm.train_dataloader())
                batch = next(loader)
            for input_ids, attention_mask, labels in rows_of(batch):
                with autocast:
                    loss = model(input_ids=input_ids.to(device()), attention_mask=attention_mask.to(device()),
                                 labels=labels.to(device())).loss
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device() == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return {"seconds": stamps[-1] - stamps[0], "pairs": args.steps * args.batch_size * args.accumulation,
            "floor_gb": floor_gb(model), "libraries_gb": libraries}


def run_plain(args) -> dict:
    def rows_of(batch):
        yield batch["input_ids"], batch["attention_mask"], batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
    return causal_lm_steps(args, rows_of)


def run_ceiling(args) -> dict:
    def rows_of(batch):
        n = batch["input_ids"].shape[0] // 2
        rows, labels = [], []
        for i in range(n):
            chosen = batch["input_ids"][i][batch["attention_mask"][i] == 1]  # prompt + chosen
            rejected = batch["input_ids"][n + i][batch["loss_mask"][n + i] == 1]
            rows.append(torch.cat([chosen, rejected]))
            label = rows[-1].clone()
            label[:len(chosen) - int(batch["loss_mask"][i].sum())] = -100  # the prompt is context, not scored
            labels.append(label)
        width = max(len(r) for r in rows)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        target = torch.full((n, width), -100, dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels)):
            ids[i, :len(row)], mask[i, :len(row)], target[i, :len(row)] = row, 1, label
        yield ids, mask, target
    return causal_lm_steps(args, rows_of)


def resolve(args) -> None:
    """Fill what the preset sets and the command line left unset; make generated pairs and random models."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    os.makedirs(args.workdir, exist_ok=True)
    if args.model.startswith("random:"):
        shape = args.model.split(":", 1)[1]
        args.model = random_model(shape, os.path.join(args.workdir, f"random-{shape}"))
        args.tokenizer = args.tokenizer or os.path.join(args.model, "tokenizer")
    args.tokenizer = args.tokenizer or args.model
    if args.pairs.startswith("generated:"):  # generated:N:QUESTION_WORDS:ANSWER_WORDS, ranges as lo-hi
        _, n, question, answer = args.pairs.split(":")
        path = os.path.join(args.workdir, args.pairs.replace(":", "_") + ".jsonl")
        if not os.path.exists(path):
            generate(path, int(n), question_words=tuple(map(int, question.split("-"))),
                     answer_words=tuple(map(int, answer.split("-"))))
        args.pairs = path


def mean_own_tokens(args) -> float:
    dm = data_module(args)
    return sum(own_tokens(p) for p in dm.train_pairs) / len(dm.train_pairs)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(torch.device("cuda"), torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="identity")
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--tokenizer", help="the tokenizer's folder, when not the model's")
    parser.add_argument("--pairs", help="a pairs file, or generated:N:QUESTION_WORDS:ANSWER_WORDS (lo-hi ranges)")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--accumulation", type=int)
    parser.add_argument("--max_length", type=int)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--sides", default="ours,trl,trl+pre,plain,ceiling",
                        help="what to run, in order: ours, trl, plain, ceiling, each with +options (see above), e.g. "
                             "ours+gc,trl+lora")
    parser.add_argument("--workdir", default="/tmp/dpo_bench", help="generated pairs, random models, TRL's output")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--side", help="internal: run one side and print JSON")
    parser.add_argument("--options", default="", help="internal: the side's options, '+'-separated")
    args = parser.parse_args()
    resolve(args)
    torch.set_num_threads(os.cpu_count() or 1)
    args.options = [o for o in args.options.split("+") if o]
    if args.side:
        runs = {"ours": run_ours, "trl": run_trl, "plain": run_plain, "ceiling": run_ceiling}
        result = runs[args.side](args)
        result["peak_memory_gb"] = peak_memory_gb()
        print_result(result)
        return
    results = {}
    base = [f"--{k}={getattr(args, k)}" for k in ("preset", "model", "tokenizer", "pairs", "batch_size",
                                                  "accumulation", "max_length", "steps", "workdir")]
    for label in args.sides.split(","):
        side, _, options = label.partition("+")
        results[label] = run_side(__file__, [*base, "--side", side, "--options", options], label)
    report(args, results)


def above(result: dict, libraries: bool = False) -> float:
    """The peak above the floor of weights, gradients and AdamW states; with ``libraries``, above that and the
    memory the side's process held after its imports."""
    return result["peak_memory_gb"] - result["floor_gb"] - (result["libraries_gb"] if libraries else 0.0)


def report(args, results: dict) -> None:
    tokens_per_pair, peak = mean_own_tokens(args), peak_flops()
    params = next((r["params"] for r in results.values() if "params" in r), None)
    print(f"preset {args.preset}: model {args.model}, pairs {args.pairs} ({tokens_per_pair:.0f} own tokens a pair), "
          f"batch {args.batch_size} x accumulation {args.accumulation}, max_length {args.max_length}, "
          f"{args.steps} timed steps, device {torch.cuda.get_device_name() if device() == 'cuda' else 'cpu'}")
    width = max(9, *(len(label) for label in results))
    print(f"{'side':{width}s} {'pairs/s':>8s} {'tokens/s':>9s} {'peak GB':>8s} {'>floor':>7s} {'>f+libs':>8s} "
          f"{'padding':>8s} {'setup s':>8s}" + (f" {'MFU':>6s}" if peak and params else ""))
    for label, r in results.items():
        r["pairs_per_s"] = r["pairs"] / r["seconds"]
        r["tokens_per_s"] = r["tokens"] / r["seconds"] if "tokens" in r else r["pairs_per_s"] * tokens_per_pair
        padding = f"{r['padding']:8.1%}" if "padding" in r else f"{'':8s}"
        setup = f"{r['setup_seconds']:8.1f}" if "setup_seconds" in r else f"{'':8s}"
        mfu = f" {6 * params * r['tokens_per_s'] / peak:6.1%}" if peak and params else ""
        print(f"{label:{width}s} {r['pairs_per_s']:8.3f} {r['tokens_per_s']:9.1f} {r['peak_memory_gb']:8.2f} "
              f"{above(r):7.2f} {above(r, libraries=True):8.2f} {padding} {setup}{mfu}")
    anchors = [label for label in results if label.startswith("trl")]
    for label in (label for label in results if label.startswith("ours")):
        ours = results[label]
        for anchor in anchors + [x for x in ("ceiling", "plain") if x in results]:
            other = results[anchor]
            print(f"{label}/{anchor}: speed {ours['pairs_per_s'] / other['pairs_per_s']:.2f}x, peak above floor "
                  f"{above(ours):.2f} / {above(other):.2f} GB ({above(ours) / above(other):.2f}x), above floor and "
                  f"libraries {above(ours, True):.2f} / {above(other, True):.2f} GB "
                  f"({above(ours, True) / above(other, True):.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("side", "options")},
                       "tokens_per_pair": tokens_per_pair, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
