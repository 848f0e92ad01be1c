"""data.max_tokens: training batches cut by a budget of pair tokens, seeded, split across ranks, weighed per pair
under accumulation, resumable."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpo_lightning.data.sampling import padding_fraction
from dpo_lightning.data.token_batches import TokenBudgetBatchSampler, cut_by_budget

from conftest import ROOT, assert_resume_equals_straight_run, fit_args, fit_tiny, run_cli

TOKENS = np.array([30, 12, 50, 8, 25, 40, 16, 33, 21, 9, 70, 14])


def test_cut_by_budget_by_hand():
    order = np.arange(6)
    # 30+12 = 42 <= 50; +50 would pass it; 50 alone; 8+25 = 33; +40 passes; 40 alone
    assert [b.tolist() for b in cut_by_budget(order, TOKENS, 50)] == [[0, 1], [2], [3, 4], [5]]
    assert [b.tolist() for b in cut_by_budget(order, TOKENS, 20)] == [[0], [1], [2], [3], [4], [5]]  # longer: alone


@pytest.mark.parametrize("group", [None, 2])
def test_batches_hold_the_budget_cover_every_pair_and_are_reproducible(group):
    sampler = TokenBudgetBatchSampler(TOKENS, 60, seed=3, group_batches=group)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(TOKENS)))  # every pair once an epoch
        assert all(TOKENS[b].sum() <= 60 or len(b) == 1 for b in batches)
        assert len(batches) == len(sampler) and sampler.batch_sizes() == [len(b) for b in batches]
        epochs.append(batches)
    assert len({len(b) for b in epochs[0]}) > 1  # many short pairs or few long ones a batch
    assert sorted(map(tuple, epochs[0])) == sorted(map(tuple, epochs[1]))  # the same batches ...
    assert epochs[0] != epochs[1]  # ... in another order each epoch
    again = TokenBudgetBatchSampler(TOKENS, 60, seed=3, group_batches=group)
    again.set_epoch(2)
    assert list(again) == epochs[2]
    one_group = TokenBudgetBatchSampler(TOKENS, 60, seed=3, group_batches=100)  # a group larger than the data
    cut = np.concatenate(one_group.batches)
    assert TOKENS[cut].tolist() == sorted(TOKENS, reverse=True)  # cut longest first: similar lengths together


def test_ranks_take_alternate_batches_of_the_same_order():
    single = TokenBudgetBatchSampler(TOKENS, 60, seed=1)
    ranks = [TokenBudgetBatchSampler(TOKENS, 60, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in (single, *ranks):
        sampler.set_epoch(1)
    order = list(single)
    assert len(order) % 2 == 1  # an odd count: rank 1 repeats the epoch's first batch
    assert list(ranks[0]) == order[0::2] and list(ranks[1]) == order[1::2] + [order[0]]
    assert len(ranks[0]) == len(ranks[1]) == (len(order) + 1) // 2


def test_padding_fraction_takes_batch_sizes():
    prompt, chosen, rejected = [2, 1, 3], [1, 2, 1], [3, 1, 1]
    # batches [0] and [1, 2]: shared rows 6 | 4, 5 -> slots 6 + 2 * 5 = 16, tokens 15
    assert padding_fraction([0, 1, 2], prompt, chosen, rejected, [1, 2], shared=True) == pytest.approx(1 - 15 / 16)
    assert padding_fraction([0, 1, 2], prompt, chosen, rejected, [1, 2]) == pytest.approx(
        1 - (2 * 2 + 1 + 3 + 2 * 1 + 2 + 1 + 2 * 3 + 1 + 1) / (2 * 5 + 2 * 2 * 4))


def test_accumulated_token_batches_equal_one_batch_of_all_pairs(tiny_model_dir, pairs_jsonl, tmp_path):
    # 6 training pairs of 28-39 tokens: a budget of 100 cuts them into batches of two or three; accumulating all of
    # them in one step must give the gradient of one batch of all six (plain SGD: Adam would hide a scale)
    run = ["--data.val_fraction=0.25", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
           "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.5", "--data.group_by_length=false"]
    runs = {"one_batch": ["--data.batch_size=6"],
            "token_batches": ["--data.max_tokens=100", "--trainer.accumulate_grad_batches=6", "--model.packing=true",
                              "--trainer.callbacks+=ddp_recorder.RecordRank",
                              f"--trainer.callbacks.out_dir={tmp_path / 'record'}"]}
    weights = {}
    for name, extra in runs.items():
        fit_tiny(tmp_path / name, tiny_model_dir, pairs_jsonl, *run, *extra)
        weights[name] = load_file(tmp_path / name / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors")
    batches = json.loads((tmp_path / "record" / "rank0.json").read_text())["batches"]
    sizes = [len(b["chosen"]) for b in batches]
    assert sum(sizes) == 6 and len(set(sizes)) > 1 and {b["step"] for b in batches} == {0}
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(weights["one_batch"][k], base[k]) for k in base)
    for k in base:
        torch.testing.assert_close(weights["token_batches"][k], weights["one_batch"][k], rtol=0, atol=1e-6, msg=k)


def test_killed_token_budget_run_resumes_to_the_same_weights(tiny_model_dir, pairs_jsonl, tmp_path):
    run = ["--data.val_fraction=0.25", "--data.max_tokens=80", "--trainer.max_epochs=2",
           "--trainer.limit_val_batches=1", "--model.optimizer.lr=1e-2", "--checkpoint.every_n_train_steps=1"]
    assert_resume_equals_straight_run(tmp_path, tiny_model_dir, pairs_jsonl, run, 5)  # in the second epoch


def test_ddp_ranks_train_on_disjoint_token_batches(tiny_model_dir, pairs_jsonl, tmp_path):
    run_cli(fit_args(tmp_path, tiny_model_dir, pairs_jsonl, "--data.max_tokens=80", "--trainer.devices=2",
                     "--trainer.strategy=ddp", "--model.packing=true", "--trainer.callbacks+=ddp_recorder.RecordRank",
                     f"--trainer.callbacks.out_dir={tmp_path / 'record'}"),
            cwd=tmp_path, extra_path=os.path.join(ROOT, "tests"))
    ranks = [json.loads((tmp_path / "record" / f"rank{r}.json").read_text())["batches"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for epoch in {b["epoch"] for b in ranks[0]}:
        seen = [tuple(row) for rank in ranks for b in rank if b["epoch"] == epoch for row in b["chosen"]]
        assert len(set(seen)) == 6  # every training pair this epoch, across the two ranks
