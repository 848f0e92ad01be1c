"""Gradient accumulation that averages over pairs, not over micro-batches."""

from __future__ import annotations

from typing import Any


def accumulation_weight(trainer: Any, n_pairs: int, batch_idx: int) -> float:
    """Weight of a micro-batch's mean loss so that an accumulation window's gradient is the mean over its pairs,
    also when the epoch's last window is short or its last batch is smaller (1.0 otherwise).

    Lightning divides every micro-batch loss by ``accumulate_grad_batches``; this undoes that per pair. Example:
    batches of 4, 4 and 2 pairs accumulated 3 at a time weigh ``4*3/10``, ``4*3/10`` and ``2*3/10``. Batches cut by
    a token budget hold different numbers of pairs throughout, and are weighed the same way.
    """
    loader = trainer.train_dataloader if trainer is not None else None
    accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
    if accumulate == 1 or loader is None:
        return 1.0
    sampler = getattr(loader, "sampler", None)
    if callable(getattr(sampler, "batch_sizes", None)):  # batches cut by a token budget (data.max_tokens)
        sizes = sampler.batch_sizes()
        n_batches, size_of = len(sizes), sizes.__getitem__
    elif sampler is not None and getattr(loader, "batch_size", None):
        size, batch = len(sampler), loader.batch_size
        n_batches, size_of = -(-size // batch), lambda k: min(batch, size - k * batch)
    else:
        return 1.0
    n_batches = min(n_batches, trainer.num_training_batches)
    start = (batch_idx // accumulate) * accumulate
    window = sum(size_of(k) for k in range(start, min(start + accumulate, n_batches)))
    return n_pairs * accumulate / window
