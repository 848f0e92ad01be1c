"""Training on each device present, as ``benchmarks/gpu_check.sh`` runs it on a CUDA GPU (``pytest -m gpu``): bf16
fits (mixed, and bf16 weights) that start at ln 2, log float32 means and export a changed model, and FSDP on one
GPU with its export. The CUDA cases carry the ``gpu`` mark and are skipped without a CUDA device; the others run
everywhere. Prefix sharing against the plain layout and the fused AdamW step take the same ``device`` parameter in
their own files."""

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import DEVICES, ROOT, fit_tiny, scalar_tags


def changed(export_dir, base_dir) -> bool:
    trained = AutoModelForCausalLM.from_pretrained(export_dir).state_dict()
    base = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    return trained.keys() == base.keys() and any(not torch.equal(trained[k].float(), base[k].float()) for k in base)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_fit_starts_at_ln2_and_exports(device, precision, tiny_model_dir, pairs_jsonl, tmp_path):
    dtype = "bfloat16" if precision == "bf16-true" else "float32"
    cli, log_dir = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, f"--trainer.accelerator={device}",
                            f"--trainer.precision={precision}", f"--model.dtype={dtype}", "--trainer.max_epochs=1")
    assert next(cli.model.policy.parameters()).device.type == device
    _, acc = scalar_tags(log_dir)
    losses = [e.value for e in acc.Scalars("train/loss")]
    # policy = reference; in bf16 a sequence's log-prob depends a little on the shape of the batch it runs in, and
    # the reference pass batches differently from training
    assert losses[0] == pytest.approx(math.log(2), abs=2e-2)
    assert all(math.isfinite(x) for x in losses) and len(losses) >= 2
    assert changed(log_dir / "hf_model", tiny_model_dir)


@pytest.mark.gpu
def test_fsdp_on_one_gpu_trains_and_exports(tiny_model_dir, pairs_jsonl, tmp_path):
    fsdp = os.path.join(ROOT, "configs", "qwen_identity_fsdp.yaml")
    cli, log_dir = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, "--config", fsdp, "--trainer.devices=1",
                            "--trainer.max_epochs=1")
    assert type(cli.trainer.strategy).__name__ == "FSDPStrategy"
    _, acc = scalar_tags(log_dir)
    assert acc.Scalars("train/loss")[0].value == pytest.approx(math.log(2), abs=1e-3)
    assert changed(log_dir / "hf_model", tiny_model_dir)


def test_metric_states_stay_float32_when_the_module_is_cast_to_bf16():
    from dpo_lightning.training.metrics import PreferenceMetrics

    metrics = PreferenceMetrics(["sigmoid"]).to(torch.bfloat16)  # as bf16-true casts the LightningModule
    loss = metrics.stages["val_metrics"]["loss"]
    assert loss.mean_value.dtype == torch.float32
    for _ in range(300):
        loss.update(torch.tensor(0.6976), 1.0)
    assert loss.compute().item() == pytest.approx(0.6976, rel=1e-5)  # a bf16 running sum of 300 is off by ~0.3%
