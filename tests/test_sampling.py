"""The training order: the seeded shuffle is DistributedSampler's, and length grouping keeps every pair once per
epoch, the DDP split, and cuts padding (measured on the collator's real batches)."""

import random

import pytest
from torch.utils.data import DistributedSampler

from dpo_lightning.data.collate import PreferenceCollator
from dpo_lightning.data.sampling import EpochShuffleSampler, padding_fraction
from dpo_lightning.model.prefix_sharing import shared_layout


@pytest.mark.parametrize("size,world", [(10, 1), (10, 3), (7, 2), (1, 4)])
def test_plain_order_is_distributed_samplers(size, world):
    data = list(range(size))
    for epoch in (0, 1, 5):
        for rank in range(world):
            ours = EpochShuffleSampler(data, seed=3, num_replicas=world, rank=rank)
            torch_sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
            ours.set_epoch(epoch)
            torch_sampler.set_epoch(epoch)
            assert list(ours) == list(torch_sampler)


def random_pairs(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt_ids": [1] * rng.randint(1, 20), "chosen_ids": [2] * rng.randint(1, 60),
             "rejected_ids": [3] * rng.randint(1, 60)} for _ in range(n)]


def real_padding(pairs, order, batch_size):
    collate = PreferenceCollator(pad_token_id=0)
    pads = slots = 0
    for start in range(0, len(order), batch_size):
        mask = collate([pairs[i] for i in order[start:start + batch_size]])["attention_mask"]
        pads += (mask == 0).sum().item()
        slots += mask.numel()
    return pads / slots


def real_shared_padding(pairs, order, batch_size):
    collate = PreferenceCollator(pad_token_id=0)
    pads = slots = 0
    for start in range(0, len(order), batch_size):
        batch = collate([pairs[i] for i in order[start:start + batch_size]])
        ids = shared_layout(batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).input_ids
        real = sum(len(pairs[i]["prompt_ids"]) + len(pairs[i]["chosen_ids"]) + len(pairs[i]["rejected_ids"])
                   for i in order[start:start + batch_size])
        pads += ids.numel() - real
        slots += ids.numel()
    return pads / slots


def test_length_grouping_keeps_every_pair_splits_ranks_and_pads_less():
    pairs = random_pairs(203)
    lengths = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    columns = [[len(p[k]) for p in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    batch = 4
    for epoch in (0, 1):
        one = EpochShuffleSampler(pairs, seed=1, lengths=lengths, batch_size=2 * batch, group_batches=5)
        one.set_epoch(epoch)
        order = list(one)
        assert sorted(order[:203]) == list(range(203))  # every pair once (then DistributedSampler's repeats)
        # two ranks with `batch` pairs each see, at step k, exactly the one-process batch of 2 * batch pairs
        ranks = []
        for rank in (0, 1):
            sampler = EpochShuffleSampler(pairs, seed=1, num_replicas=2, rank=rank, lengths=lengths,
                                          batch_size=batch, group_batches=5)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        for k in range(len(ranks[0]) // batch):
            step = ranks[0][k * batch:(k + 1) * batch] + ranks[1][k * batch:(k + 1) * batch]
            assert sorted(step) == sorted(order[k * 2 * batch:(k + 1) * 2 * batch])
        plain = EpochShuffleSampler(pairs, seed=1)
        plain.set_epoch(epoch)
        grouped_pad, plain_pad = real_padding(pairs, order, 2 * batch), real_padding(pairs, list(plain), 2 * batch)
        assert grouped_pad < 0.7 * plain_pad  # what is left: chosen and rejected rows padded to one width
        # the reported share is the collator's own padding
        assert padding_fraction(order, *columns, 2 * batch) == pytest.approx(grouped_pad, abs=1e-12)
        assert padding_fraction(list(plain), *columns, 2 * batch) == pytest.approx(plain_pad, abs=1e-12)
        # ... and the shared layout's own padding
        shared_pad = real_shared_padding(pairs, order, 2 * batch)
        assert padding_fraction(order, *columns, 2 * batch, shared=True) == pytest.approx(shared_pad, abs=1e-12)
        assert shared_pad < grouped_pad
    # epochs differ, and the order is not simply longest first
    first, second = (EpochShuffleSampler(pairs, seed=1, lengths=lengths, batch_size=8) for _ in range(2))
    second.set_epoch(1)
    assert list(first) != list(second)
    firsts = [lengths[i] for i in list(first)[::8]]
    assert firsts != sorted(firsts, reverse=True)
