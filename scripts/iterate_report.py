"""Prints ``iterate`` runs round by round: ``python scripts/iterate_report.py RUN_DIR...``.

Per round: prompts sampled, pairs, the samples' mean reward, and on the held-out prompts the mean reward, each reward
term's mean (the share of answers passing, for a 0/1 check) and the share of degenerate answers.
"""

import json
import os
import sys


def main(run_dirs: list[str]) -> None:
    header = None
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "rounds.json"), encoding="utf-8") as f:
            records = json.load(f)
        for record in records:
            terms = sorted(k[:-len("_mean")] for k in record["eval"] if k.endswith("_mean") and k != "reward_mean")
            if header is None:
                header = terms
                print("| run | round | prompts | pairs | samples' reward | held-out reward | "
                      + " | ".join(f"held-out {t}" for t in terms) + " | degenerate |")
                print("|---" * (7 + len(terms)) + "|")
            samples = record.get("samples", {}).get("reward_mean")
            cells = [os.path.basename(run_dir.rstrip("/")), record["round"], record.get("prompts", "-"),
                     record.get("pairs", "-"), "-" if samples is None else f"{samples:.3f}",
                     f"{record['eval']['reward_mean']:.3f}"]
            cells += [f"{record['eval'][f'{t}_mean']:.3f}" for t in header]
            cells.append(f"{record['eval']['degenerate_rate']:.1%}")
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
