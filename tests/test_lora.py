"""model.lora.use_peft: LoRA adapters on the policy, the reference is the policy with adapters off, and the export is
merged plain weights or the adapter alone."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpo_lightning.cli import cli_main
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.model.logprobs import response_logps
from dpo_lightning.model.lora import merged_state_dict

from conftest import dpo_module, fit_tiny, scalar_tags

peft = pytest.importorskip("peft")


def batch_of(tiny_model_dir, pairs_jsonl):
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=tiny_model_dir, batch_size=4,
                              cache_dir=None)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def lora_module(tiny_model_dir, **kwargs):
    module = dpo_module(tiny_model_dir, use_peft=True, lora_r=4, lora_alpha=8.0, **kwargs)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():  # as after some training: B != 0, so the adapters change the output
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return module


def test_lora_loss_and_gradients_equal_the_merged_plain_model(tiny_model_dir, pairs_jsonl):
    batch = batch_of(tiny_model_dir, pairs_jsonl)
    module = lora_module(tiny_model_dir)
    assert module.reference.model is None  # no second model: the reference is the policy with adapters off
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    x, _ = module.pair_logps(batch)
    beta = module.loss_settings.beta
    loss = F.softplus(-beta * ((x.policy_chosen_logps - x.policy_rejected_logps)
                               - (x.reference_chosen_logps - x.reference_rejected_logps))).mean()
    loss.backward()

    # independent: the base model loaded on its own is the reference ...
    inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        ref = response_logps(base, *inputs).logps
    assert torch.allclose(torch.cat([x.reference_chosen_logps, x.reference_rejected_logps]), ref, atol=1e-5)
    # ... and a plain model with W + alpha/r * B @ A is the policy, with the same loss
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain.load_state_dict(merged_state_dict(module.policy))
    pol = response_logps(plain, *inputs).logps
    assert torch.allclose(torch.cat([x.policy_chosen_logps, x.policy_rejected_logps]), pol, atol=1e-5)
    assert not torch.allclose(pol, ref, atol=1e-3)  # the adapters do change the output
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    plain_loss = F.softplus(-beta * ((pc - pr) - (rc - rr))).mean()
    assert loss.item() == pytest.approx(plain_loss.item(), abs=1e-6)
    plain_loss.backward()
    # chain rule through W' = W + s * B @ A: dL/dB = s * dL/dW' @ A^T and dL/dA = s * B^T @ dL/dW'
    scale = module.lora_settings.lora_alpha / module.lora_settings.lora_r
    layers = {n: m for n, m in module.policy.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert layers
    plain_params = dict(plain.named_parameters())
    for name, layer in layers.items():
        key = name.split("base_model.model.", 1)[1] + ".weight"
        grad_w = plain_params[key].grad
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.allclose(b.grad, scale * grad_w @ a.detach().T, atol=1e-5), name
        assert torch.allclose(a.grad, scale * b.detach().T @ grad_w, atol=1e-5), name


def test_lora_at_start_is_the_base_model(tiny_model_dir, pairs_jsonl):
    batch = batch_of(tiny_model_dir, pairs_jsonl)
    module = dpo_module(tiny_model_dir, use_peft=True)
    module.configure_model()
    x, _ = module.pair_logps(batch)
    assert torch.equal(x.policy_chosen_logps, x.reference_chosen_logps)


def test_bad_lora_settings_fail_before_loading():
    with pytest.raises(ValueError, match="lora_r"):
        dpo_module("does-not-exist", use_peft=True, lora_r=0)


LORA = ["--model.lora.use_peft=true", "--model.lora.lora_r=4", "--model.optimizer.init_args.lr=0.01"]


def test_lora_fit_checkpoint_and_both_exports(tiny_model_dir, pairs_jsonl, tmp_path, model_loads):
    cli, run = fit_tiny(tmp_path / "merged", tiny_model_dir, pairs_jsonl, *LORA, cache_dir=tmp_path / "cache")
    assert model_loads == [tiny_model_dir]  # one model in memory
    _, acc = scalar_tags(str(run))
    assert abs(acc.Scalars("val/rewards/margins")[-1].value) > 1e-3  # it trained

    # the checkpoint holds the adapters only; the frozen base is rebuilt from its path
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_" in k for k in keys if k.startswith("policy."))

    # the merged export is plain transformers and computes what the trained adapters compute
    policy = cli.model.policy.eval()
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model").eval()
    assert not os.path.exists(run / "hf_model" / "adapter_config.json")
    ids = torch.tensor([[5, 9, 12, 20, 7, 30]])
    with torch.no_grad():
        want = policy(input_ids=ids).logits
        assert torch.allclose(exported(input_ids=ids).logits, want, atol=1e-5)
        with policy.disable_adapter():
            assert not torch.allclose(policy(input_ids=ids).logits, want, atol=1e-4)

    # `export` from the checkpoint gives the same weights
    out = tmp_path / "from_ckpt"
    cli_main(["export", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"--output_dir={out}"])
    a, b = load_file(run / "hf_model" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # adapter export: peft's files, which load back onto the base to the same outputs
    _, run2 = fit_tiny(tmp_path / "adapter", tiny_model_dir, pairs_jsonl, *LORA, "--model.lora.lora_export=adapter",
                       cache_dir=tmp_path / "cache")
    assert (run2 / "hf_model" / "adapter_config.json").exists()
    assert not (run2 / "hf_model" / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = peft.PeftModel.from_pretrained(base, run2 / "hf_model").eval()
    with torch.no_grad():  # seeded runs: the same training, so the same outputs as the merged run
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)


def test_lora_with_precomputed_reference_trains_the_same(tiny_model_dir, pairs_jsonl, tmp_path, model_loads):
    cache = tmp_path / "cache"
    _, plain = fit_tiny(tmp_path / "plain", tiny_model_dir, pairs_jsonl, *LORA,
                        "--model.reference.precompute_ref_log_probs=false", cache_dir=cache)
    _, pre = fit_tiny(tmp_path / "pre", tiny_model_dir, pairs_jsonl, *LORA,
                      "--model.reference.precompute_ref_log_probs=true", cache_dir=cache)
    assert model_loads == [tiny_model_dir, tiny_model_dir]  # the precompute pass used the policy, adapters off
    _, a = scalar_tags(str(plain))
    _, b = scalar_tags(str(pre))
    for m in ("loss", "rewards/margins", "logps/chosen"):
        assert [s.value for s in b.Scalars(f"val/{m}")] == pytest.approx(
            [s.value for s in a.Scalars(f"val/{m}")], abs=1e-5), m


def test_an_adapter_of_a_relative_base_path_loads_from_another_folder(tiny_model_dir, pairs_jsonl, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_model_dir))
    _, run = fit_tiny(tmp_path, os.path.basename(tiny_model_dir), pairs_jsonl, *LORA, "--trainer.max_steps=1",
                      "--model.lora.lora_export=adapter")
    with open(run / "hf_model" / "adapter_config.json", encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_model_dir
    monkeypatch.chdir(tmp_path)
    peft.AutoPeftModelForCausalLM.from_pretrained(run / "hf_model")  # finds its base from another working directory
