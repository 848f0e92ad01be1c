"""Writes the arithmetic prompts of the on-policy demo (configs/iterate_arithmetic.yaml): sums and differences of
numbers up to 20 and products of one-digit numbers, each asking for a last line ``Answer: <number>``; the row's
``answer`` is what ``dpo_lightning.pairs.verifiable.FinalAnswer`` checks.

``train.jsonl`` is sampled for training; ``heldout.jsonl`` holds all other operand pairs and two phrasings that appear
in no training prompt, and is only answered for evaluation. Run from the repository root:
``python data/arithmetic/make_prompts.py``.
"""

import json
import os
import random

TRAIN_PHRASINGS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
                   "Calculate {a} {op} {b}.", "Work out {a} {op} {b}."]
HELDOUT_PHRASINGS = ["Could you tell me what {a} {op} {b} equals?", "Find the value of {a} {op} {b}."]
FORMAT = " Finish with a line of the form 'Answer: <number>'."
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "×":
        return rng.randint(2, 9), rng.randint(2, 9)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def main() -> None:
    rng = random.Random(0)
    problems = sorted({(op, *operands(rng, op)) for op in OPERATIONS for _ in range(400)})
    rng.shuffle(problems)
    # every problem not sampled for training is held out: 233 of them, enough to separate two recipes by a few points
    splits = {"heldout": (problems[:64] + problems[320:], HELDOUT_PHRASINGS),
              "train": (problems[64:320], TRAIN_PHRASINGS)}
    here = os.path.dirname(os.path.abspath(__file__))
    for name, (chosen, phrasings) in splits.items():
        with open(os.path.join(here, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for k, (op, a, b) in enumerate(chosen):
                prompt = phrasings[k % len(phrasings)].format(a=a, op=op, b=b) + FORMAT
                f.write(json.dumps({"prompt": prompt, "answer": str(OPERATIONS[op](a, b))}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
