"""A round's pairs for ``iterate``: the best and the worst sample of each prompt (``pairs.jsonl``), and with
``train_pairs: accumulated`` the training file of every round's pairs so far (``train_pairs.jsonl``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from ..atomic import atomic_open
from ..eval.generation import Answer
from .build import pair_row, plain_prompt
from .scoring import Scored, pick_pair


def write_pairs(round_dir: str, samples: list[dict], min_gap: float, mark_unfinished: bool,
                tokenizer: Any) -> Counter:
    """Best and worst answer of each prompt as a pair (``pairs.jsonl``; plain text when ``tokenizer``, the
    policy's, has no chat template); returns the kept and dropped counts, and where the samples hold a greedy
    answer, how many pairs it is chosen (``greedy_chosen``) and rejected (``greedy_rejected``) in."""
    counts: Counter = Counter(kept=0)
    out = []
    for s in samples:
        scored = [Scored(Answer(a["text"], a["finished"], a["num_tokens"]), a["reward"], a["terms"])
                  for a in s["answers"]]
        pair, why = pick_pair(scored, min_gap)
        if pair is None:
            counts[why] += 1
            continue
        chosen, rejected = pair
        greedy = next((a["text"] for a in s["answers"] if a.get("greedy")), None)
        if greedy is not None:
            counts["greedy_chosen"] += chosen.answer.text == greedy
            counts["greedy_rejected"] += rejected.answer.text == greedy
        out.append(pair_row(s["prompt"], s["system"], chosen.answer.text, rejected.answer.text, "on_policy",
                            mark_unfinished and not chosen.answer.finished,
                            mark_unfinished and not rejected.answer.finished,
                            plain_prompt(tokenizer, s["prompt"], s["system"])))
        counts["kept"] += 1
    if not out:
        raise RuntimeError(f"{round_dir}: no prompt gave a pair ({dict(counts)}): raise num_samples or temperature, "
                           "lower min_reward_gap, or use a reward that tells the answers apart")
    with atomic_open(os.path.join(round_dir, "pairs.jsonl"), encoding="utf-8") as f:
        for row in out:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts


def accumulate_pairs(output_dir: str, r: int) -> int:
    """Write ``round_<r>/train_pairs.jsonl``: the pairs of rounds 1 to ``r``, in round order; returns their
    number."""
    rows = []  # write_pairs' files: one JSON row per line, each ending in a newline
    for k in range(1, r + 1):
        with open(os.path.join(output_dir, f"round_{k}", "pairs.jsonl"), encoding="utf-8") as f:
            rows += f.readlines()
    with atomic_open(os.path.join(output_dir, f"round_{r}", "train_pairs.jsonl"), encoding="utf-8") as f:
        f.writelines(rows)
    return len(rows)
