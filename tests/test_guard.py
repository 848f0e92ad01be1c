"""NaN/inf guard: training stops with a clear message before a bad update, and the last checkpoint stays good."""

import pytest
import torch
from lightning.pytorch import Callback

from dpo_lightning.training.guard import first_nonfinite_grad

from conftest import fit_tiny


class PoisonGradient(Callback):
    """Puts a NaN into one gradient at optimizer step ``step``."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.policy.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


STEP_BY_STEP = ["--data.batch_size=1", "--checkpoint.every_n_train_steps=1"]  # 6 steps an epoch, each checkpointed


def test_nan_gradient_stops_before_the_update_and_keeps_the_last_checkpoint(tiny_model_dir, pairs_jsonl, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in policy\..* at global step 2.*last\.ckpt"):
        fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *STEP_BY_STEP, "--trainer.callbacks+=test_guard.PoisonGradient")
    checkpoint = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                            weights_only=True)
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_diverging_run_stops_with_a_clear_message(tiny_model_dir, pairs_jsonl, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite (loss|gradient)"):
        fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *STEP_BY_STEP, "--model.optimizer.lr=1e20",
                 "--model.scheduler.warmup_ratio=0")
    checkpoint = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt",
                            weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_guard_can_be_switched_off(tiny_model_dir, pairs_jsonl, tmp_path):
    # the same poisoned step 2 as above: without the guard, training runs the whole epoch and the NaN is applied
    cli, run = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *STEP_BY_STEP,
                        "--trainer.callbacks+=test_guard.PoisonGradient", "--nan_guard.enabled=false",
                        "--trainer.max_epochs=1", "--export.enabled=false")
    assert cli.trainer.global_step == 6
    assert not all(torch.isfinite(p).all() for p in cli.model.policy.parameters())
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert not all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_first_nonfinite_grad_names_the_parameter_and_passes_huge_finite_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert first_nonfinite_grad(model) is None  # no gradients yet
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert first_nonfinite_grad(model) is None
    model[1].weight.grad[0, 0] = 1e30  # finite, but its square overflows the fused norm: the scan clears it
    assert not torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert first_nonfinite_grad(model) is None
    model[1].bias.grad[1] = float("-inf")
    assert first_nonfinite_grad(model) == "1.bias"
    model[0].weight.grad[2, 1] = float("nan")
    assert first_nonfinite_grad(model) == "0.weight"  # the first in parameter order
