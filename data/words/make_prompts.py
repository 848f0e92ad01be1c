"""Writes the prompts of the word-use task (configs/iterate_words.yaml): "write one sentence that uses all of these
words" and "do not use any commas", six common English words per prompt; the row's ``words`` is what
``dpo_lightning.pairs.verifiable.WordsUsed`` checks.

``train.jsonl`` (256 prompts, four phrasings) is sampled for training; ``heldout.jsonl`` (200 prompts) asks other
sets of words in two phrasings that appear in no training prompt, and is only answered for evaluation. No set of
words is asked twice. Run from the repository root: ``python data/words/make_prompts.py``.
"""

import argparse
import json
import os
import random
from typing import Optional

WORDS = """apple bakery basket beach bicycle blanket boat bottle bread bridge bucket butter button cabin camera
candle carpet castle chair cheese chicken city clock cloud coat coffee cookie corn cottage desert diamond doctor
door dragon drum eagle engine farmer feather fence field flower forest fountain garden gate ghost glass glove
guitar hammer harbor hat helmet hill honey horse island jacket jungle kettle key kitchen kite ladder lake lamp
lemon letter library lion map market mirror monkey moon mountain museum needle ocean onion orange owl painter
paper parrot pencil piano pillow pirate planet pocket potato queen rabbit radio rain ribbon river robot rocket
rope sailor school shadow sheep shoe shovel silver snake soldier spoon station storm street sugar sun table
teacher tent ticket tiger tower train tree truck tunnel umbrella valley village violin wagon whale window
winter wolf yellow""".split()
TRAIN_PHRASINGS = ["Write one sentence that uses all of these words: {words}.",
                   "Use every one of these words in a single sentence: {words}.",
                   "Make up one sentence containing all of the following words: {words}.",
                   "Write a sentence with each of these words in it: {words}."]
HELDOUT_PHRASINGS = ["Compose a single sentence that includes all of these words: {words}.",
                     "Please write one sentence in which every one of these words appears: {words}."]
NO_COMMAS = " Do not use any commas."  # so that a list of the words is not an answer
WORDS_PER_PROMPT, TRAIN_PROMPTS, HELDOUT_PROMPTS = 6, 256, 200


def write(path: str, sets: list[tuple[str, ...]], phrasings: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for k, words in enumerate(sets):
            prompt = phrasings[k % len(phrasings)].format(words=", ".join(words)) + NO_COMMAS
            f.write(json.dumps({"prompt": prompt, "words": list(words)}, ensure_ascii=False) + "\n")


def main(out_dir: Optional[str] = None) -> None:
    out_dir = out_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(0)
    sets: list[tuple[str, ...]] = []
    seen: set[frozenset] = set()
    while len(sets) < TRAIN_PROMPTS + HELDOUT_PROMPTS:
        words = tuple(rng.sample(WORDS, WORDS_PER_PROMPT))
        if frozenset(words) not in seen:
            seen.add(frozenset(words))
            sets.append(words)
    write(os.path.join(out_dir, "train.jsonl"), sets[:TRAIN_PROMPTS], TRAIN_PHRASINGS)
    write(os.path.join(out_dir, "heldout.jsonl"), sets[TRAIN_PROMPTS:], HELDOUT_PHRASINGS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default=None, help="where to write train.jsonl and heldout.jsonl "
                        "(default: next to this script)")
    main(parser.parse_args().out_dir)
