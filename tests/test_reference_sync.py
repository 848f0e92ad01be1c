"""TR-DPO (sync_ref_model): the reference moves towards the policy every few optimizer steps."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from dpo_lightning.data.datamodule import PreferenceDataModule

from conftest import dpo_module


class Snapshots(Callback):
    """Policy and reference weights after each optimizer step (the end of the batch that stepped)."""

    def __init__(self) -> None:
        self.policy, self.reference = {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.policy:
            self.policy[step] = [p.detach().clone() for p in module.policy.parameters()]
            self.reference[step] = [p.detach().clone() for p in module.reference.model.parameters()]


def fit(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path, ckpt_path=None, **kwargs):
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, batch_size=2,
                              cache_dir=None)
    model = dpo_module(tiny_model_dir, reference_name_or_path=tiny_reference_dir,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.5), **kwargs)
    snapshots = Snapshots()
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, max_steps=4, accumulate_grad_batches=2, limit_val_batches=0,
                      callbacks=[snapshots])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer, snapshots


def test_reference_is_mixed_with_the_policy_every_n_steps(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    model, trainer, snap = fit(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path, sync_ref_model=True,
                               ref_model_mixup_alpha=0.3, ref_model_sync_steps=2)
    assert model.reference.model is not None  # precompute (on by default) gave way: the reference is needed each step
    start = [p.detach() for p in AutoModelForCausalLM.from_pretrained(tiny_reference_dir).parameters()]
    after_2 = [0.3 * p + 0.7 * r for p, r in zip(snap.policy[2], start)]
    after_4 = [0.3 * p + 0.7 * r for p, r in zip(snap.policy[4], after_2)]
    for expected, step in ((start, 1), (after_2, 2), (after_2, 3), (after_4, 4)):
        for a, b in zip(snap.reference[step], expected):
            assert torch.allclose(a, b, atol=1e-6), step
    assert not torch.allclose(snap.policy[4][0], snap.policy[2][0])  # the policy did move between syncs
    # the moved reference is saved, and a resumed run starts from it rather than from reference_name_or_path
    path = trainer.checkpoint_callback.best_model_path
    saved = [v for k, v in torch.load(path, weights_only=False)["state_dict"].items() if k.startswith("reference.")]
    assert len(saved) == len(after_4) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(saved, after_4))
    resumed, _, _ = fit(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path / "resumed", sync_ref_model=True,
                        ref_model_mixup_alpha=0.3, ref_model_sync_steps=2, ckpt_path=path)
    for a, b in zip(resumed.reference.model.parameters(), after_4):
        assert torch.allclose(a, b, atol=1e-6)


def test_without_sync_the_reference_stays_and_is_left_out_of_checkpoints(tiny_model_dir, tiny_reference_dir,
                                                                         pairs_jsonl, tmp_path):
    model, _, snap = fit(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path, precompute_ref_log_probs=False)
    for a, b in zip(snap.reference[1], snap.reference[4]):
        assert torch.equal(a, b)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])


def test_sync_settings_that_cannot_work_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="ref_model_mixup_alpha in \\(0, 1\\]"):
        dpo_module(tiny_model_dir, sync_ref_model=True, ref_model_mixup_alpha=0.0)
    for kwargs, message in (({"use_peft": True}, "does not work with model.lora.use_peft"),
                            ({"loss_type": "simpo"}, "use no reference model")):
        if kwargs.get("use_peft"):
            pytest.importorskip("peft")
        module = dpo_module(tiny_model_dir, sync_ref_model=True, **kwargs)
        with pytest.raises(ValueError, match=message):
            module.configure_model()
