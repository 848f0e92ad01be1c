"""DPOModule on a tiny random Llama: step-0 invariants, the log-prob path, the frozen reference."""

import math

import pytest
import torch
from lightning.pytorch import Trainer

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.losses import sequence_logps
from dpo_lightning.model.logprobs import response_logps

from conftest import dpo_module


def make(tiny_model_dir, pairs_jsonl, tmp_path, **model_kwargs):
    dm = PreferenceDataModule(train_path=pairs_jsonl, val_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir,
                              batch_size=3, cache_dir=None)
    model = dpo_module(tiny_model_dir, **model_kwargs)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1)
    return model, dm, trainer


def test_untrained_policy_validates_to_ln2_and_zero_rewards(tiny_model_dir, pairs_jsonl, tmp_path):
    # the reference forward on the same layout as the policy: bit-equal log-probs, so exactly zero rewards
    model, dm, trainer = make(tiny_model_dir, pairs_jsonl, tmp_path, beta=0.3, precompute_ref_log_probs=False)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[f"val/{name}"] == pytest.approx(0.0, abs=1e-6), name
    assert metrics["val/logps/chosen"] < 0 and metrics["val/logps/rejected"] < 0


def test_completion_only_logps_equal_full_logits_with_gradients(tiny_model_dir, pairs_jsonl):
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, batch_size=4,
                              cache_dir=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = dpo_module(tiny_model_dir)
    module.configure_model()
    policy = module.policy.double()
    fast = response_logps(policy, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], chunk_size=7,
                          token_stats=True)
    fast.logps.sum().backward()
    fast_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    slow = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    slow.sum().backward()
    assert torch.allclose(fast.logps.double(), slow, atol=1e-9)
    for a, p in zip(fast_grads, policy.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-9)
    mask = batch["loss_mask"][:, 1:].bool()
    expected_logit_sums = (logits[:, :-1].mean(-1) * mask).sum(-1)
    assert torch.allclose(fast.logit_sums.double(), expected_logit_sums, atol=1e-9)
    assert fast.tokens.tolist() == mask.sum(-1).tolist()
    # token statistics from the full logits, by their definitions
    probs = torch.softmax(logits[:, :-1].detach(), -1)  # (2B, T-1, V)
    entropy = -(probs * probs.log()).sum(-1)
    targets = batch["input_ids"][:, 1:]
    top1 = probs.argmax(-1) == targets
    p_target = probs.gather(-1, targets[..., None]).squeeze(-1)
    wpo = torch.log(p_target / (probs ** 2).sum(-1))  # log p(y_t) - log sum_v p_v^2
    assert torch.allclose(fast.stats.entropy.double(), (entropy * mask).sum(-1), atol=1e-9)
    assert fast.stats.top1.tolist() == (top1 & mask).sum(-1).tolist()
    assert torch.allclose(fast.stats.wpo_logps.double(), (wpo * mask).sum(-1), atol=1e-9)


def test_reference_is_frozen_and_left_out(tiny_model_dir, pairs_jsonl, tmp_path):
    model, dm, trainer = make(tiny_model_dir, pairs_jsonl, tmp_path, precompute_ref_log_probs=False)
    trainer.fit(model, datamodule=dm)
    assert not any(p.requires_grad for p in model.reference.model.parameters())
    assert not model.reference.model.training and model.policy.training
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in model.reference.model.parameters()}
    assert in_optimizer == {id(p) for p in model.policy.parameters()}
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and not [k for k in state if k.startswith("reference.")]
    assert all(k.startswith("policy.") for k in state)
    fresh = torch.load(path, weights_only=True)  # loads without unpickling code
    assert fresh["hyper_parameters"]["model_name_or_path"] == tiny_model_dir


def test_training_moves_the_policy_and_not_the_reference(tiny_model_dir, pairs_jsonl, tmp_path):
    model, dm, trainer = make(tiny_model_dir, pairs_jsonl, tmp_path, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    model.configure_model()
    before_ref = [p.clone() for p in model.reference.model.parameters()]
    before_pol = [p.clone() for p in model.policy.parameters()]
    val0 = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=dm)
    val1 = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/loss"]
    assert all(torch.equal(a, b) for a, b in zip(before_ref, model.reference.model.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_pol, model.policy.parameters()))
    assert val1 < val0


def test_reference_free_loads_no_reference(tiny_model_dir):
    module = dpo_module(tiny_model_dir, reference_free=True)
    module.configure_model()
    assert module.reference.model is None
    simpo = dpo_module(tiny_model_dir, loss_type="simpo")
    simpo.configure_model()
    assert simpo.reference.model is None


def test_bad_model_settings_fail_before_loading():
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_module("does-not-exist", loss_type=["sigmoid", "sft"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="beta"):
        dpo_module("does-not-exist", beta=0)
    with pytest.raises(ValueError, match="unknown loss"):
        dpo_module("does-not-exist", loss_type="nope")
    with pytest.raises(ValueError, match="exo_pair needs model.loss.label_smoothing > 0"):
        dpo_module("does-not-exist", loss_type="exo_pair")
    with pytest.raises(ValueError, match=r"'js_divergence' works only with .*\['apo_zero'\] have no f-divergence"):
        dpo_module("does-not-exist", loss_type=["sigmoid", "apo_zero"], f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="discopop_tau must be positive"):
        dpo_module("does-not-exist", loss_type="discopop", discopop_tau=0.0)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, pairs_jsonl):
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, batch_size=4,
                              cache_dir=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    results = []
    for checkpointing in (False, True):
        module = dpo_module(tiny_model_dir, reference_name_or_path=None, gradient_checkpointing=checkpointing)
        module.configure_model()
        module.policy.train()
        x, _ = module.pair_logps(batch)
        loss = torch.nn.functional.logsigmoid(x.policy_chosen_logps - x.policy_rejected_logps).sum()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.policy.parameters()]))
    assert module.policy.is_gradient_checkpointing
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, atol=1e-6)
