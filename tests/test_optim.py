"""The default optimizer and warmup/decay schedule."""

import pytest
import torch

from dpo_lightning.optim import AdamW, WarmupDecayLR


def lrs(decay, total=10, warmup_ratio=0.2):
    opt = AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupDecayLR(opt, warmup_ratio=warmup_ratio, decay=decay)
    sched.set_total_steps(total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_linear_warmup_then_linear_decay():
    # warmup ceil(0.2 * 10) = 2 steps: 1/3, 2/3; then 1 - (s - 2) / 8
    assert lrs("linear") == pytest.approx([1 / 3, 2 / 3, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_cosine_and_constant():
    cosine = lrs("cosine")
    assert cosine[2] == pytest.approx(1.0) and cosine[6] == pytest.approx(0.5) and cosine[-1] < 0.05
    assert lrs("constant")[2:] == [1.0] * 8


def test_no_warmup_starts_at_full_lr_and_defaults_are_dpo_sized():
    assert lrs("linear", warmup_ratio=0.0)[0] == 1.0
    opt = AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["lr"] == 1e-6 and opt.defaults["weight_decay"] == 0.0
