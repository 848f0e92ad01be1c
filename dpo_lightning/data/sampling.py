"""Training order that survives interruption: a shuffle fixed by (seed, epoch) and a loader that resumes mid-epoch.

Lightning stores the ``state_dict`` of a loader that has one in the checkpoint and hands it back on resume, so a
run killed mid-epoch continues with exactly the batches it had not seen, in the same order (see
``tests/test_resume.py``). Under DDP each rank takes its strided share of the same seeded order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence, Sized, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a permutation of ``range(len(data))`` that depends only on ``seed`` and the epoch.

    Position ``i`` of the epoch's permutation goes to rank ``i % num_replicas``, so with ``B`` pairs per device
    the ranks' step-``k`` batches together are positions ``[k*B*W, (k+1)*B*W)``: exactly the batch one process
    with ``B*W`` pairs trains on at step ``k`` (``tests/test_ddp.py``). When the data does not divide evenly, the
    first positions are repeated, as ``DistributedSampler`` does. Being a ``DistributedSampler``, Lightning uses
    it as it is instead of wrapping it in a second, differently seeded shuffle.

    With ``lengths`` (the padded length of each pair), the permutation is cut into groups of ``group_batches``
    global batches; each group is sorted by length and cut into global batches, whose order is then shuffled
    (the short last batch stays last). Batches then hold pairs of similar length: less padding, the same pairs
    every epoch, the same seeded order on every rank (as ``transformers``' ``LengthGroupedSampler``).
    """

    def __init__(self, data: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 lengths: Optional[Sequence[int]] = None, batch_size: int = 1, group_batches: int = 50) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.lengths, self.batch_size, self.group_batches = lengths, batch_size, group_batches
        self._last: Optional[tuple[int, np.ndarray]] = None  # (epoch, its order)

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's order over all ranks (``total_size`` indices); rank ``r`` takes positions ``r::W``."""
        if self._last is None or self._last[0] != epoch:  # the start-of-fit report and the epoch share one
            self._last = epoch, self._global_order(epoch)
        return self._last[1]

    def _global_order(self, epoch: int) -> np.ndarray:
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).numpy()  # as DistributedSampler
        order = np.concatenate([order, np.resize(order, self.total_size - len(order))])  # repeat the first ones
        if self.lengths is None:
            return order
        lengths = np.asarray(self.lengths)
        n, step = len(order), self.batch_size * self.num_replicas  # step: one global batch
        span = step * self.group_batches
        # longest first within each group, ties in shuffled order (a stable sort keyed by group, then length)
        ranked = order[np.lexsort((-lengths[order], np.arange(n) // span))]
        batches = []  # global batch numbers in training order: each group's full batches shuffled, its short one last
        for start in range(0, n, span):
            size = min(span, n - start)
            n_batches, full = -(-size // step), size // step
            batches.append(start // step + torch.randperm(full, generator=generator).numpy())
            batches.append(np.arange(start // step + full, start // step + n_batches))
        positions = (np.concatenate(batches)[:, None] * step + np.arange(step)).ravel()
        return ranked[positions[positions < n]]  # only the last batch can be short

    def __iter__(self) -> Iterator[int]:
        return map(int, self.global_order(self.epoch)[self.rank:self.total_size:self.num_replicas])  # no list


def padding_fraction(order: Sequence[int], prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int],
                     batch_size: Union[int, Sequence[int]], shared: bool = False) -> float:
    """Share of the token slots that are padding when ``order`` is cut into batches of ``batch_size`` pairs (or of
    the given sizes, one per batch) and each batch's ``2 * size`` rows are padded to its longest
    (``PreferenceCollator``), or with ``shared`` its ``size`` rows ``[prompt, chosen, rejected]``
    (``model/prefix_sharing.py``)."""
    order = np.asarray(order, dtype=np.int64)
    if len(order) == 0:
        return 0.0
    p, c, r = (np.asarray(x, dtype=np.int64)[order] for x in (prompt, chosen, rejected))
    if isinstance(batch_size, (int, np.integer)):
        starts = np.arange(0, len(order), batch_size)
    else:
        starts = np.cumsum([0, *batch_size[:-1]])
    sizes = np.diff(np.append(starts, len(order)))
    if shared:
        real = int((p + c + r).sum())
        slots = int((sizes * np.maximum.reduceat(p + c + r, starts)).sum())
    else:
        real = int((2 * p + c + r).sum())
        slots = int(2 * (sizes * np.maximum.reduceat(p + np.maximum(c, r), starts)).sum())
    return 1.0 - real / slots if slots else 0.0


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that can resume mid-epoch.

    Lightning saves its ``state_dict`` in checkpoints and calls ``load_state_dict`` on resume. Each pass starts
    by calling ``start_epoch(resuming)``, which sets the sampler's epoch and returns how many batches to skip:
    those the interrupted epoch had already trained on (the trainer's restored count; the loader's own count
    would be off by the batch Lightning fetches ahead).
    """

    def __init__(self, *args: Any, start_epoch: Callable[[bool], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_epoch, self._resuming = start_epoch, False

    def __iter__(self) -> Iterator[Any]:
        skip = self.start_epoch(self._resuming)
        self._resuming = False
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"resumable": True}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resuming = bool(state_dict.get("resumable"))
