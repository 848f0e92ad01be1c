"""Writes the arithmetic prompts of the on-policy demo (configs/iterate_arithmetic.yaml): sums and differences of
numbers up to 20 and products of one-digit numbers, each asking for a last line ``Answer: <number>``; the row's
``answer`` is what ``dpo_lightning.pairs.verifiable.FinalAnswer`` checks.

``train.jsonl`` is sampled for training; ``heldout.jsonl`` holds all other operand pairs and two phrasings that appear
in no training prompt, and is only answered for evaluation. Run from the repository root:
``python data/arithmetic/make_prompts.py``.

``--mix half --out_dir DIR`` writes a harder mix instead (docs/iterate.md, "Where the initial model is rarely
right, do the rounds help?"): half of each file small problems as above, half sums and differences of two-digit
numbers (10 to 99), each row's ``kind`` saying which; 128 + 128 sampled problems, shuffled, and 120 + 120 other
ones held out, the small ones first. ``--mix two_digit`` writes two-digit problems only: 256 sampled, 240 held out
(docs/iterate.md, "On two-digit problems only, do the rounds help?").
"""

import argparse
import json
import os
import random
from typing import Optional

TRAIN_PHRASINGS = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "How much is {a} {op} {b}?",
                   "Calculate {a} {op} {b}.", "Work out {a} {op} {b}."]
HELDOUT_PHRASINGS = ["Could you tell me what {a} {op} {b} equals?", "Find the value of {a} {op} {b}."]
FORMAT = " Finish with a line of the form 'Answer: <number>'."
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
TRAIN_PER_KIND, HELDOUT_PER_KIND = 128, 120  # the half mix
MIXES = ("small", "half", "two_digit")


def operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "×":
        return rng.randint(2, 9), rng.randint(2, 9)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def two_digit_operands(rng: random.Random, op: str) -> tuple[int, int]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def write(out_dir: str, name: str, problems: list[tuple], phrasings: list[str]) -> None:
    """One row per problem (operation, operands, and its kind in the two-digit mix): the prompt, the result as
    ``answer``, and ``kind`` when given."""
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        for k, (op, a, b, *kind) in enumerate(problems):
            row = {"prompt": phrasings[k % len(phrasings)].format(a=a, op=op, b=b) + FORMAT,
                   "answer": str(OPERATIONS[op](a, b)), **({"kind": kind[0]} if kind else {})}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(out_dir: Optional[str] = None, mix: str = "small") -> None:
    if mix not in MIXES:
        raise ValueError(f"mix {mix!r}: expected one of {', '.join(MIXES)}")
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(0)
    problems = sorted({(op, *operands(rng, op)) for op in OPERATIONS for _ in range(400)})
    rng.shuffle(problems)
    if mix == "small":
        # every problem not sampled for training is held out: 233 of them, enough to separate two recipes by a few
        # points
        write(out_dir, "heldout", problems[:64] + problems[320:], HELDOUT_PHRASINGS)
        write(out_dir, "train", problems[64:320], TRAIN_PHRASINGS)
        return
    small = [(*p, "small") for p in problems]
    draws = 200 if mix == "half" else 400  # 496 distinct two-digit problems for the two-digit files
    harder = sorted({(op, *two_digit_operands(rng, op)) for op in "+-" for _ in range(draws)})
    rng.shuffle(harder)
    known = set(problems)  # a problem such as 12 - 11 is of both kinds: kept as a small one
    harder = [(*p, "two_digit") for p in harder if p not in known]
    end = TRAIN_PER_KIND + HELDOUT_PER_KIND
    if mix == "two_digit":
        write(out_dir, "train", harder[:2 * TRAIN_PER_KIND], TRAIN_PHRASINGS)
        write(out_dir, "heldout", harder[2 * TRAIN_PER_KIND:2 * end], HELDOUT_PHRASINGS)
        return
    train = small[:TRAIN_PER_KIND] + harder[:TRAIN_PER_KIND]
    rng.shuffle(train)  # each round's prompts mix both kinds
    write(out_dir, "train", train, TRAIN_PHRASINGS)
    write(out_dir, "heldout", small[TRAIN_PER_KIND:end] + harder[TRAIN_PER_KIND:end], HELDOUT_PHRASINGS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", help="where to write train.jsonl and heldout.jsonl (default: beside this file)")
    parser.add_argument("--mix", choices=MIXES, default="small",
                        help="small problems (the shipped files), half of them two-digit sums and differences, or "
                             "two-digit ones only")
    main(**vars(parser.parse_args()))
