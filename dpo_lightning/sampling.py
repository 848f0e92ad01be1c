"""Training order that survives interruption: a shuffle fixed by (seed, epoch) and a loader that resumes mid-epoch.

Lightning stores the ``state_dict`` of a loader that has one in the checkpoint and hands it back on resume, so a
run killed mid-epoch continues with exactly the batches it had not seen, in the same order (see
``tests/test_resume.py``). Under DDP each rank takes its strided share of the same seeded order.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sized

from torch.utils.data import DataLoader, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """This rank's share of a permutation of ``range(len(data))`` that depends only on ``seed`` and the epoch.

    Position ``i`` of the epoch's permutation goes to rank ``i % num_replicas``, so with ``B`` pairs per device
    the ranks' step-``k`` batches together are positions ``[k*B*W, (k+1)*B*W)``: exactly the batch one process
    with ``B*W`` pairs trains on at step ``k`` (``tests/test_ddp.py``). When the data does not divide evenly, the
    first positions are repeated, as ``DistributedSampler`` does. Being a ``DistributedSampler``, Lightning uses
    it as it is instead of wrapping it in a second, differently seeded shuffle.
    """

    def __init__(self, data: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)


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
