"""Greedy answers: batch sizes, and dropping ended rows against one plain ``generate`` call per batch.

    python benchmarks/bench_generation.py --prompts data/identity/general_train.jsonl --max_new_tokens 192 \
        --batch_sizes 32,128

Answers the prompts (no system message, as the identity demo) once per batch size with plain ``generate`` and once
with ``greedy_dropping_finished`` at the largest batch size; prints each pass's wall time, its time relative to the
first pass, and how many answers differ from the first pass's. Needs the demo's model
(``python -m dpo_lightning fetch-smollm2 --output_dir models/SmolLM2-135M-Instruct``). Compare times within one run
only: this machine's speed drifts by about 15% over hours.
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.eval import generation
from dpo_lightning.eval.generation import chat_messages, generate_answers, render_prompt
from dpo_lightning.eval.probes import read_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", default="data/identity/general_train.jsonl", help="comma-separated files")
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--batch_sizes", default="32,128", help="comma-separated; the largest also runs dropping")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    questions = [q for path in args.prompts.split(",") for q in read_questions(path)]
    prompts = [render_prompt(tokenizer, chat_messages(q, None)) for q in questions]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    passes = [(f"plain, batch {b}", b, False) for b in sizes] + [(f"dropping, batch {max(sizes)}", max(sizes), True)]
    allowed = generation.drops_finished_rows
    first, first_time = None, None
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens at most")
    for label, batch_size, drop in passes:
        generation.drops_finished_rows = allowed if drop else (lambda model: False)
        start = time.perf_counter()
        answers = [a[0] for a in generate_answers(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                                  batch_size=batch_size)]
        seconds = time.perf_counter() - start
        texts = [(a.text, a.finished) for a in answers]
        first, first_time = first or texts, first_time or seconds
        differ = sum(x != y for x, y in zip(texts, first))
        print(f"{label:>20}: {seconds:6.1f} s ({seconds / first_time:.2f}x), {sum(f for _, f in texts)} ended, "
              f"{differ} answers differ from the first pass")
    generation.drops_finished_rows = allowed


if __name__ == "__main__":
    main()
