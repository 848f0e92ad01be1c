"""How a run's step time evolved, from the ``throughput/`` scalars its TensorBoard log holds.

    python -m dpo_lightning fit --config configs/smollm2_identity.yaml --trainer.limit_val_batches 0 \\
      --trainer.precision 32-true
    python benchmarks/step_times.py lightning_logs/version_0

Prints, per block of ``--block`` optimizer steps, the mean step time, the tokens/s (the pairs' own tokens) and the
padding share, then the tokens/s of the last block over the first. A steady run stays near 1.0x; tokens/s rather
than the step time, since steps differ in length.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log_dir")
    parser.add_argument("--block", type=int, default=10, help="steps a row")
    args = parser.parse_args()
    acc = EventAccumulator(args.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    series = {name: [e.value for e in acc.Scalars(f"throughput/{name}")]
              for name in ("step_time", "tokens_per_sec", "padding_share")}
    times, rates, padding = series["step_time"], series["tokens_per_sec"], series["padding_share"]
    tokens = [t * r for t, r in zip(times, rates)]
    print(f"{'steps':>9s} {'step s':>7s} {'tokens/s':>9s} {'padding':>8s}")
    blocks = []
    for start in range(0, len(times), args.block):
        part = slice(start, start + args.block)
        seconds, count = sum(times[part]), len(times[part])
        blocks.append(sum(tokens[part]) / seconds)
        print(f"{start:4d}-{start + count - 1:<4d} {seconds / count:7.2f} {blocks[-1]:9.1f} "
              f"{sum(p * t for p, t in zip(padding[part], times[part])) / seconds:8.1%}")
    print(f"{len(times)} steps, {sum(times):.0f} s; tokens/s of the last {args.block} steps / the first "
          f"{args.block}: {blocks[-1] / blocks[0]:.2f}x")


if __name__ == "__main__":
    main()
