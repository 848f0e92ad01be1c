"""The default optimizer and warmup/decay schedule."""

import pytest
import torch

from dpo_lightning.training.optim import AdamW, WarmupDecayLR

from conftest import DEVICES


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


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_takes_the_fused_kernel_and_matches_the_formula(device):
    # three steps of torch's fused kernel against AdamW written out in float64 (decoupled weight decay)
    torch.manual_seed(0)
    start = torch.randn(5, 3, device=device)
    grads = [torch.randn(5, 3, device=device) for _ in range(3)]
    param = torch.nn.Parameter(start.clone())
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    opt = AdamW([{"params": (p for p in [param])}], lr=lr, weight_decay=wd)  # a group given as a generator
    assert opt.defaults["fused"] is True
    for g in grads:
        param.grad = g.clone()
        opt.step()
    p, m, v = start.double(), torch.zeros_like(start, dtype=torch.float64), torch.zeros_like(start, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    torch.testing.assert_close(param.detach().double(), p, rtol=1e-6, atol=1e-7)
    assert AdamW([torch.nn.Parameter(torch.zeros(1))], fused=False).defaults["fused"] is False
