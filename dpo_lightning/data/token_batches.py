"""Training batches cut by a token budget rather than a pair count (``data.max_tokens``).

A batch takes pairs in a shuffled order while their own tokens (prompt once, both responses: the length of the
pair's ``[prompt, chosen, rejected]`` row under prefix sharing or packing) stay within the budget; a pair longer
than the budget is a batch of its own. Short pairs then come many to a batch and long ones few, so each step does
about the same work. With ``model.packing`` a batch's pairs are packed into rows.

The batches are cut once, from a shuffle seeded by ``seed``; each epoch then trains on them in an order seeded by
(seed, epoch), as fairseq's token-budget batches do: every epoch has the same number of steps, and a resumed run
skips exactly the batches it had trained on. With length grouping, the shuffled pairs are cut into groups of
``group_batches`` budgets' worth of tokens, and each group is sorted longest first before it is cut. Under DDP
every rank sees the same batch order and takes every ``W``-th batch; when their count does not divide by ``W``, the
first batches of the epoch are repeated, as ``DistributedSampler`` repeats its first pairs.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def cut_by_budget(order: np.ndarray, tokens: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """``order`` cut into consecutive batches whose ``tokens`` sum to at most ``max_tokens`` (a longer pair alone)."""
    batches, start, total = [], 0, 0
    for position, index in enumerate(order):
        if position > start and total + tokens[index] > max_tokens:
            batches.append(order[start:position])
            start, total = position, 0
        total += tokens[index]
    if start < len(order):
        batches.append(order[start:])
    return batches


class TokenBudgetBatchSampler(DistributedSampler):
    """This rank's batches of pair indices for an epoch, each within ``max_tokens`` pair tokens (module docstring).

    It yields lists of indices; the loader takes it as its ``sampler`` with ``batch_size=None``, so each list is
    one batch. A ``DistributedSampler``, so that Lightning uses it as it is under DDP instead of injecting its own.

    Args:
        tokens: each pair's own tokens (prompt + chosen + rejected).
        max_tokens: the budget of pair tokens per batch.
        seed: the batches are cut from a shuffle with this seed; epoch ``e`` orders them with ``seed + e``.
        group_batches: with length grouping, budgets' worth of tokens per length-sorted group; None: no grouping.
    """

    def __init__(self, tokens: Sequence[int], max_tokens: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 group_batches: Optional[int] = None) -> None:
        super().__init__(range(len(tokens)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.tokens, self.max_tokens, self.group_batches = np.asarray(tokens, dtype=np.int64), max_tokens, group_batches
        self.batches = self._cut()
        self._sizes: Optional[tuple[int, list[int]]] = None  # (epoch, this rank's batch sizes)

    def _cut(self) -> list[np.ndarray]:
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        order = torch.randperm(len(self.tokens), generator=generator).numpy()
        if self.group_batches is None:
            return cut_by_budget(order, self.tokens, self.max_tokens)
        batches: list[np.ndarray] = []
        span = self.group_batches * self.max_tokens  # tokens per group
        thresholds = np.arange(span, self.tokens.sum() + span, span)
        ends = np.searchsorted(np.cumsum(self.tokens[order]), thresholds, side="right")  # last one: len(order)
        for group in np.split(order, np.unique(ends)[:-1]):
            ranked = group[np.argsort(-self.tokens[group], kind="stable")]  # longest first, ties as shuffled
            batches += cut_by_budget(ranked, self.tokens, self.max_tokens)
        return batches

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches over all ranks, a multiple of ``num_replicas`` of them; rank ``r`` takes ``r::W``."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        batches = [self.batches[k] for k in torch.randperm(len(self.batches), generator=generator).tolist()]
        short = -len(batches) % self.num_replicas  # repeated from the epoch's first batches
        return batches + [batches[k % len(batches)] for k in range(short)] if batches else batches

    def batch_sizes(self) -> list[int]:
        """Pairs in each of this rank's batches of the current epoch."""
        if self._sizes is None or self._sizes[0] != self.epoch:
            batches = self.global_batches(self.epoch)[self.rank::self.num_replicas]
            self._sizes = self.epoch, [len(b) for b in batches]
        return self._sizes[1]

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        return (b.tolist() for b in self.global_batches(self.epoch)[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return -(-len(self.batches) // self.num_replicas)
