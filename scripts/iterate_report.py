"""Prints ``iterate`` runs round by round: ``python scripts/iterate_report.py RUN_DIR... [--by F] [--paired T]``.

Per round: prompts sampled, pairs, the pairs trained on (more than the round's own with ``train_pairs:
accumulated``), the samples' mean reward, and on the held-out prompts the mean reward, each reward
term's mean (the share of answers passing, for a 0/1 check) and the share of degenerate answers.

``--by FIELD`` adds, per round, each reward term's held-out mean per value of a field of the held-out prompt rows
(e.g. ``kind`` in ``data/arithmetic/heldout.jsonl``): a held-out answer is traced to its row by its ``where``
(``PATH line N``).

``--paired TERM`` then compares the runs' last rounds two by two (the first run with the second, the third with the
fourth, ...) prompt by prompt on a reward term: for a 0/1 term (e.g. ``right``) how many held-out prompts only one
of the two passes, for a graded one (e.g. ``used``, a share) on how many each scores higher; and the two-sided sign
test on those (exact binomial): the chance of a split at least this uneven if neither model were better; with
several comparisons (one per data order, say), also the counts pooled.
"""

import argparse
import json
import math
import os
import re


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


# how the prompts one run scores higher on are named: passes only it, for a 0/1 term; scores higher, for a graded one
COUNTS = {True: "only the first {}, only the second {}", False: "higher on the first {}, on the second {}"}


def paired(run_dirs: list[str], term: str) -> tuple[int, int]:
    """Compare the runs two by two (the first with the second, the third with the fourth, ...) prompt by prompt;
    print each comparison and, for more than one, the counts pooled. Returns the pooled counts (prompts where the
    first run of a comparison scores higher, where the second does; for a 0/1 term: only it passes)."""
    if len(run_dirs) % 2:
        raise SystemExit("--paired compares runs two by two: give an even number of run folders")
    pooled, all_binary = [0, 0], True
    for first, second in zip(run_dirs[::2], run_dirs[1::2]):
        (round_a, a), (round_b, b) = last_eval(first), last_eval(second)
        if set(a) != set(b):
            raise SystemExit(f"{first} and {second} answered different held-out prompts")
        score_a, score_b = ({k: rows[k]["terms"][term] for k in a} for rows in (a, b))
        binary = all(v in (0, 1) for v in [*score_a.values(), *score_b.values()])
        all_binary = all_binary and binary
        only_a = sum(score_a[k] > score_b[k] for k in a)
        only_b = sum(score_b[k] > score_a[k] for k in a)
        pooled = [pooled[0] + only_a, pooled[1] + only_b]
        if binary:
            shown_a, shown_b = (str(sum(v == 1 for v in s.values())) for s in (score_a, score_b))
        else:
            shown_a, shown_b = (f"mean {sum(s.values()) / len(s):.3f}" for s in (score_a, score_b))
        print(f"{term}, {len(a)} held-out prompts: {os.path.basename(first.rstrip('/'))} round {round_a} {shown_a}, "
              f"{os.path.basename(second.rstrip('/'))} round {round_b} {shown_b}; "
              f"{COUNTS[binary].format(only_a, only_b)}, sign test p = {sign_test(only_a, only_b):.3f}")
    if len(run_dirs) > 2:
        print(f"{term}, pooled over {len(run_dirs) // 2} comparisons: {COUNTS[all_binary].format(*pooled)}, "
              f"sign test p = {sign_test(*pooled):.3f}")
    return pooled[0], pooled[1]


def field_of(where: str, field: str, rows: dict[str, dict[str, dict]]) -> str:
    """``field`` of the prompt row that ``where`` (``PATH line N`` or ``PATH row N``, as ``iterate`` records it)
    names; ``rows`` caches each file's rows by their location."""
    from dpo_lightning.data.reading import read_rows

    found = re.fullmatch(r"(.*) (?:line|row) \d+", where)
    if found is None:
        raise SystemExit(f"{where}: not a prompt row's location")
    path = found.group(1)
    if path not in rows:
        rows[path] = dict(read_rows(path))
    value = rows[path].get(where, {}).get(field)
    if value is None:
        raise SystemExit(f"{where}: no field {field!r}")
    return str(value)


def by_field(run_dirs: list[str], field: str) -> dict[tuple[str, int, str], dict[str, float]]:
    """Print and return each round's held-out term means per value of ``field``: (run, round, value) -> means."""
    rows, out = {}, {}
    for run_dir in run_dirs:
        run = os.path.basename(run_dir.rstrip("/"))
        with open(os.path.join(run_dir, "rounds.json"), encoding="utf-8") as f:
            rounds = [record["round"] for record in json.load(f)]
        for number in rounds:
            with open(os.path.join(run_dir, f"round_{number}", "eval.jsonl"), encoding="utf-8") as f:
                answers = [json.loads(text) for text in f]
            groups: dict[str, list[dict]] = {}
            for answer in answers:
                groups.setdefault(field_of(answer["where"], field, rows), []).append(answer["terms"])
            for value, terms in sorted(groups.items()):
                out[run, number, value] = {t: sum(x[t] for x in terms) / len(terms) for t in sorted(terms[0])}
                print(f"{run} round {number}, {field} {value} ({len(terms)}): " + ", ".join(
                    f"{t} {m:.3f}" for t, m in out[run, number, value].items()))
    return out


def main(run_dirs: list[str]) -> None:
    header = None
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, "rounds.json"), encoding="utf-8") as f:
            records = json.load(f)
        for record in records:
            terms = sorted(k[:-len("_mean")] for k in record["eval"] if k.endswith("_mean") and k != "reward_mean")
            if header is None:
                header = terms
                print("| run | round | prompts | pairs | trained on | samples' reward | held-out reward | "
                      + " | ".join(f"held-out {t}" for t in terms) + " | degenerate |")
                print("|---" * (8 + len(terms)) + "|")
            samples = record.get("samples", {}).get("reward_mean")
            cells = [os.path.basename(run_dir.rstrip("/")), record["round"], record.get("prompts", "-"),
                     record.get("pairs", "-"), record.get("train_pairs", record.get("pairs", "-")),
                     "-" if samples is None else f"{samples:.3f}",
                     f"{record['eval']['reward_mean']:.3f}"]
            cells += [f"{record['eval'][f'{t}_mean']:.3f}" for t in header]
            cells.append(f"{record['eval']['degenerate_rate']:.1%}")
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--by", metavar="FIELD",
                        help="a field of the held-out prompt rows to break the figures down by")
    parser.add_argument("--paired", metavar="TERM",
                        help="a reward term (0/1 or graded) to compare the runs' last rounds on, two by two")
    args = parser.parse_args()
    main(args.run_dirs)
    if args.by:
        by_field(args.run_dirs, args.by)
    if args.paired:
        paired(args.run_dirs, args.paired)
