"""Gradient accumulation that averages over pairs, not over micro-batches."""

from __future__ import annotations

from typing import Any


def accumulation_weight(trainer: Any, n_pairs: int, batch_idx: int) -> float:
    """Weight of a micro-batch's mean loss so that an accumulation window's gradient is the mean over its pairs,
    also when the epoch's last window is short or its last batch is smaller (1.0 otherwise).

    Lightning divides every micro-batch loss by ``accumulate_grad_batches``; this undoes that per pair. Example:
    batches of 4, 4 and 2 pairs accumulated 3 at a time weigh ``4*3/10``, ``4*3/10`` and ``2*3/10``.
    """
    loader = trainer.train_dataloader if trainer is not None else None
    accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
    if accumulate == 1 or loader is None or not hasattr(loader, "sampler") or not loader.batch_size:
        return 1.0
    size, batch = len(loader.sampler), loader.batch_size
    n_batches = min(-(-size // batch), trainer.num_training_batches)
    start = (batch_idx // accumulate) * accumulate
    window = sum(min(batch, size - k * batch) for k in range(start, min(start + accumulate, n_batches)))
    return n_pairs * accumulate / window
