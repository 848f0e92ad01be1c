"""Cost of the token statistics (entropy, top-1, WPO) in the chunked LM head, against the head alone.

    python benchmarks/bench_token_stats.py

Times ``head_logps`` forward + backward on random hidden states with SmolLM2-135M's head shape (576 -> 49152), as
many response tokens as a demo micro-batch scores, with and without ``token_stats``; prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dpo_lightning.model.logprobs import head_logps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    rows, cols = torch.zeros(args.tokens, dtype=torch.long), torch.arange(args.tokens)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    out_index, lengths = torch.arange(args.tokens) * 4 // args.tokens, torch.full((4,), args.tokens // 4)

    def run(stats: bool) -> float:
        start = time.perf_counter()
        out = head_logps(head, hidden, rows, cols, targets, out_index, 4, 1024, lengths, token_stats=stats)
        out.logps.sum().backward()
        return time.perf_counter() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    for stats in (False, True):
        run(stats)  # warm-up
    for _ in range(args.repeats):
        for stats in (False, True):
            times[stats].append(run(stats))
    plain, with_stats = (statistics.median(times[s]) * 1000 for s in (False, True))
    print(f"{args.tokens} tokens, head {args.hidden} -> {args.vocab}, {torch.get_num_threads()} threads")
    print(f"head forward+backward: {plain:.1f} ms; with token statistics: {with_stats:.1f} ms "
          f"(+{with_stats - plain:.1f} ms, {with_stats / plain:.2f}x)")


if __name__ == "__main__":
    main()
