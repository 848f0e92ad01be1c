"""Training order that survives interruption: a shuffle fixed by (seed, epoch) and a loader that resumes mid-epoch.

Lightning stores the ``state_dict`` of a loader that has one in the checkpoint and hands it back on resume, so a
run killed mid-epoch continues with exactly the batches it had not seen, in the same order (see
``tests/test_resume.py``). Under DDP Lightning wraps the sampler in a ``DistributedSamplerWrapper``: each rank
takes its shard of the same seeded order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sized

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(len(data))`` that depends only on ``seed`` and the epoch (``set_epoch``)."""

    def __init__(self, data: Sized, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = len(data), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


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
