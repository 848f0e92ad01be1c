"""Gradient clipping and the NaN guard under mixed precision, with the default fused AdamW.

Lightning refuses to clip for an optimizer that unscales inside ``step`` (fused AdamW) under any mixed precision,
bf16 included; DPOModule clips those itself. Under fp16 loss scaling an overflowing gradient is the scaler's to
skip, not the guard's to stop on. CPU runs ``16-mixed`` as bf16, so fp16 is asked for with an explicit
``MixedPrecision`` plugin and a CPU ``GradScaler``.
"""

import json

import pytest
import torch
from lightning.pytorch import Callback

from conftest import fit_tiny


def fp16_plugin(init_scale: float = 2.0 ** 16) -> str:
    return "--trainer.plugins+=" + json.dumps({
        "class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
        "init_args": {"precision": "16-mixed", "device": "cpu", "scaler": {
            "class_path": "torch.amp.GradScaler", "init_args": {"device": "cpu", "init_scale": init_scale}}}})


class OverflowGradient(Callback):
    """Puts an inf into one gradient after the backward of optimizer step ``step`` (every step when None)."""

    def __init__(self, step=None) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.step is None or trainer.global_step == self.step:
            next(p for p in pl_module.policy.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


def fit(tmp_path, model_dir, data, *extra):
    """Three optimizer steps, no validation, no export; the CLI and the policy's weights after them."""
    cli, _ = fit_tiny(tmp_path, model_dir, data, "--export.enabled=false", "--trainer.max_steps=3",
                      "--trainer.limit_val_batches=0", *extra)
    return cli, {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16"])
def test_clipping_with_the_fused_default_equals_lightnings_own_clipping(precision, tiny_model_dir, pairs_jsonl,
                                                                       tmp_path):
    args = ["--trainer.precision=bf16-mixed"] if precision == "bf16-mixed" else [fp16_plugin()]
    clip = ["--trainer.gradient_clip_val=0.05"]
    _, fused = fit(tmp_path / "a", tiny_model_dir, pairs_jsonl, *args, *clip)
    _, unfused = fit(tmp_path / "b", tiny_model_dir, pairs_jsonl, *args, *clip,
                     "--model.optimizer.init_args.fused=false")  # Lightning unscales and clips this one itself
    _, unclipped = fit(tmp_path / "c", tiny_model_dir, pairs_jsonl, *args)
    assert max_difference(fused, unfused) < 1e-6
    assert max_difference(fused, unclipped) > 1e-4  # the clipping acted


def test_fp16_overflow_is_skipped_by_the_scaler_not_stopped_by_the_guard(tiny_model_dir, pairs_jsonl, tmp_path):
    cli, weights = fit(tmp_path, tiny_model_dir, pairs_jsonl, fp16_plugin(), "--trainer.gradient_clip_val=1.0",
                       "--trainer.callbacks+=test_mixed_precision.OverflowGradient",
                       "--trainer.callbacks.init_args.step=1")
    assert cli.trainer.global_step == 3
    assert cli.trainer.precision_plugin.scaler.get_scale() == 2.0 ** 15  # halved once, for the skipped step
    optimizer = cli.trainer.optimizers[0]
    assert all(state["step"].item() == 2 for state in optimizer.state.values())  # 3 steps, one skipped
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_fp16_overflow_that_scaling_cannot_cure_stops(tiny_model_dir, pairs_jsonl, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in policy\..* fp16 loss scale at 0\.5"):
        fit(tmp_path, tiny_model_dir, pairs_jsonl, fp16_plugin(init_scale=4.0), "--trainer.max_steps=10",
            "--trainer.callbacks+=test_mixed_precision.OverflowGradient")
