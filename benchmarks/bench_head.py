"""The LM head's log-probs, forward and backward: a linear head that keeps no logits against autograd's chunk loop.

    python benchmarks/bench_head.py                       # SmolLM2-135M's and Qwen2.5-0.5B's head shapes
    python benchmarks/bench_head.py --positions 4096 --shapes qwen2.5-0.5b

``head_logps`` takes ``model/linear_head.py`` for a plain ``nn.Linear`` head: each chunk's logits are computed again
in the backward pass. Any other callable takes the generic loop, whose chunks' ``(n, V)`` logits autograd keeps for
the backward pass; wrapping the same head in a lambda selects it, so both sides run the same weights and inputs.
Random weights (no download), fp32, a DPO-like upstream gradient (a different weight per position). Each side runs in
its own process; printed: seconds per forward+backward (median of the timed repeats), the bytes autograd keeps for
the backward pass, and the process's peak RSS above the inputs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from sides import print_result, run_side  # benchmarks/sides.py

from dpo_lightning.model.logprobs import head_logps

SHAPES = {"smollm2-135m": (576, 49152), "qwen2.5-0.5b": (896, 151936)}  # (hidden size, vocabulary)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(side: str, shape: str, positions: int, chunk_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    hidden_size, vocab = SHAPES[shape]
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(1, positions, hidden_size)
    targets = torch.randint(0, vocab, (positions,))
    rows, cols = torch.zeros(positions, dtype=torch.long), torch.arange(positions)
    out_index = (torch.arange(positions) * 2 // positions).long()  # two responses: chosen, rejected
    tokens = torch.bincount(out_index, minlength=2)
    fn = head if side == "linear" else (lambda x: head(x))
    base = rss_gb()
    times, kept = [], 0
    for _ in range(repeats + 1):
        h = hidden.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        kept_storages = {}  # storage -> bytes: views of one tensor count once

        def keep(t: torch.Tensor) -> torch.Tensor:
            kept_storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = head_logps(fn, h, rows, cols, targets, out_index, 2, chunk_size, tokens, token_stats=True)
        (out.logps * torch.tensor([1.0, -1.0])).sum().backward()
        times.append(time.perf_counter() - start)
        kept_storages.pop(head.weight.untyped_storage().data_ptr(), None)  # the weight exists anyway
        kept_storages.pop(h.untyped_storage().data_ptr(), None)  # and so do the hidden states
        kept = sum(kept_storages.values())
    return {"seconds": statistics.median(times[1:]), "kept_gb": kept / 2**30, "peak_above_gb": rss_gb() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--positions", type=int, default=1024, help="scored response positions in the batch")
    parser.add_argument("--chunk_size", type=int, default=1024, help="model.logits_chunk_size")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes after one warm-up")
    parser.add_argument("--side", help="internal: run one side and print JSON")
    parser.add_argument("--shape", help="internal")
    args = parser.parse_args()
    if args.side:
        print_result(measure(args.side, args.shape, args.positions, args.chunk_size, args.repeats))
        return
    print(f"{args.positions} positions, chunks of {args.chunk_size}, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'shape':14s} {'side':8s} {'s/pass':>7s} {'kept GB':>8s} {'peak GB':>8s}")
    for shape in args.shapes:
        results = {}
        for side in ("linear", "autograd"):
            results[side] = r = run_side(__file__, ["--side", side, "--shape", shape, f"--positions={args.positions}",
                                                    f"--chunk_size={args.chunk_size}", f"--repeats={args.repeats}"],
                                         f"{shape} {side}")
            print(f"{shape:14s} {side:8s} {r['seconds']:7.3f} {r['kept_gb']:8.3f} {r['peak_above_gb']:8.3f}")
        a, b = results["linear"], results["autograd"]
        print(f"{shape}: linear / autograd time {a['seconds'] / b['seconds']:.2f}x, peak above the inputs "
              f"{a['peak_above_gb']:.2f} / {b['peak_above_gb']:.2f} GB")


if __name__ == "__main__":
    main()
