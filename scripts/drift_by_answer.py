"""Which general answers a trained model's drift comes from: per system prompt of a ``compare`` output, the per-token
NLL change of each of the base's general answers, largest first (``compare`` reports only their mean).

    python scripts/drift_by_answer.py RUN_DIR BASE_MODEL [--compare_json RUN_DIR/compare.json] [--top 5]
"""

import argparse
import json
import os

import torch

from dpo_lightning.eval.probes import answer_nll
from dpo_lightning.model.loading import load_causal_lm, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a fit run with hf_model/ (the trained model)")
    parser.add_argument("base_model", help="the base model's folder or hub id")
    parser.add_argument("--compare_json", help="a compare output with the base's general answers "
                                               "(default RUN_DIR/compare.json)")
    parser.add_argument("--trained", help="the trained model (default RUN_DIR/hf_model)")
    parser.add_argument("--top", type=int, default=5, help="answers shown per system prompt")
    args = parser.parse_args()
    with open(args.compare_json or os.path.join(args.run_dir, "compare.json"), encoding="utf-8") as f:
        earlier = json.load(f)
    tokenizer = load_tokenizer(args.base_model)
    base = load_causal_lm(args.base_model, "float32")
    trained = load_causal_lm(args.trained or os.path.join(args.run_dir, "hf_model"), "float32")
    questions = earlier["general_questions"]
    with torch.no_grad():
        for row in earlier["system_prompts"]:
            system, answers = row["system_prompt"], row["before_general_answers"]
            changes = []
            for question, answer in zip(questions, answers):
                before = answer_nll(base, tokenizer, [question], [answer], system)
                after = answer_nll(trained, tokenizer, [question], [answer], system)
                tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
                changes.append((after / before - 1, tokens, question, answer))
            print(f"== system prompt {row['label']}: drift {row['drift'] - 1:+.1%} (mean over every token)")
            for change, tokens, question, answer in sorted(changes, reverse=True)[:args.top]:
                print(f"  {change:+8.1%} {tokens:4d} tokens  {question[:45]!r} -> {answer[:60]!r}")


if __name__ == "__main__":
    main()
