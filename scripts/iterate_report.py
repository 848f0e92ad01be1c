"""Prints ``iterate`` runs round by round: ``python scripts/iterate_report.py RUN_DIR... [--paired TERM]``.

Per round: prompts sampled, pairs, the samples' mean reward, and on the held-out prompts the mean reward, each reward
term's mean (the share of answers passing, for a 0/1 check) and the share of degenerate answers.

``--paired TERM`` then compares the last round of each run with the first run's last round prompt by prompt on a
0/1 reward term (e.g. ``right``): how many held-out prompts only one of the two passes, and the two-sided sign test
on those (exact binomial): the chance of a split at least this uneven if neither model were better.
"""

import argparse
import json
import math
import os


def last_eval(run_dir: str) -> tuple[int, dict[str, dict]]:
    """The last round's number and its held-out answers (``eval.jsonl``), by their source line."""
    with open(os.path.join(run_dir, "rounds.json"), encoding="utf-8") as f:
        last = json.load(f)[-1]["round"]
    with open(os.path.join(run_dir, f"round_{last}", "eval.jsonl"), encoding="utf-8") as f:
        return last, {row["where"]: row for row in map(json.loads, f)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least as uneven as wins:losses | each side equally likely)."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(run_dirs: list[str], term: str) -> None:
    base_round, base = last_eval(run_dirs[0])
    for run_dir in run_dirs[1:]:
        last, other = last_eval(run_dir)
        if set(other) != set(base):
            raise SystemExit(f"{run_dir} and {run_dirs[0]} answered different held-out prompts")
        only_base = sum(base[k]["terms"][term] == 1 and other[k]["terms"][term] == 0 for k in base)
        only_other = sum(base[k]["terms"][term] == 0 and other[k]["terms"][term] == 1 for k in base)
        both = sum(base[k]["terms"][term] == 1 == other[k]["terms"][term] for k in base)
        print(f"{term}, {len(base)} held-out prompts: {os.path.basename(run_dirs[0].rstrip('/'))} round "
              f"{base_round} {both + only_base}, {os.path.basename(run_dir.rstrip('/'))} round {last} "
              f"{both + only_other}; only the first {only_base}, only the second {only_other}, sign test "
              f"p = {sign_test(only_base, only_other):.3f}")


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--paired", metavar="TERM", help="a 0/1 reward term to compare the runs' last rounds on")
    args = parser.parse_args()
    main(args.run_dirs)
    if args.paired:
        paired(args.run_dirs, args.paired)
