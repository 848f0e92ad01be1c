"""Mixture-of-experts models: the router load-balancing loss joins the DPO loss as TRL adds it.

TRL's DPOTrainer adds ``router_aux_loss_coef x aux_loss`` for every model whose config has
``output_router_logits``, with the coefficient the config declares unless ``router_aux_loss_coef`` is set.
"""

import pytest
import torch

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.losses import sequence_logps

from conftest import build_tokenizer, conversational_rows, dpo_module


def moe_config(model_type: str, vocab_size: int, coef: float):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_experts_per_tok=2, router_aux_loss_coef=coef, pad_token_id=0,
                  eos_token_id=3, bos_token_id=None, tie_word_embeddings=False)
    if model_type == "mixtral":
        return AutoConfig.for_model("mixtral", intermediate_size=32, num_local_experts=4, **common)
    if model_type == "qwen2_moe":  # shared expert beside the routed ones
        return AutoConfig.for_model("qwen2_moe", intermediate_size=32, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=16, num_experts=4, **common)
    if model_type == "granitemoe":  # logits divided by logits_scaling: the full-logits path
        return AutoConfig.for_model("granitemoe", intermediate_size=32, num_local_experts=4, logits_scaling=2.0,
                                    **common)
    raise ValueError(model_type)


def save_moe(tmp_path, model_type: str, seed: int, coef: float = 0.5) -> str:
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(model_type, len(tok), coef))
    with torch.no_grad():  # spread the logits and the router's choices
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    path = tmp_path / f"{model_type}_{seed}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def validate(policy_dir, reference_dir, path, n_rows, tmp_path, **kwargs):
    from lightning.pytorch import Trainer

    dm = PreferenceDataModule(train_path=path, val_path=path, tokenizer_name_or_path=policy_dir, batch_size=n_rows,
                              max_length=None, max_prompt_length=None, cache_dir=None)
    model = dpo_module(policy_dir, reference_name_or_path=reference_dir, **kwargs)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    return model, trainer.validate(model, datamodule=dm, verbose=False)[0]


# granitemoe is left out: TRL 1.16 reads config.num_experts, which GraniteMoe's config names num_local_experts
# (AttributeError); the next test checks it against the model's own forward
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_loss_and_aux_loss_match_trl(tmp_path, pairs_jsonl, model_type):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trl = pytest.importorskip("trl")
    policy_dir, reference_dir = save_moe(tmp_path, model_type, 0), save_moe(tmp_path, model_type, 1)
    rows = conversational_rows()
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=len(rows), beta=0.1,
                         report_to="none", use_cpu=True, max_length=None, dataloader_num_workers=0, bf16=False)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir),
                             ref_model=AutoModelForCausalLM.from_pretrained(reference_dir), args=args,
                             processing_class=AutoTokenizer.from_pretrained(policy_dir),
                             train_dataset=datasets.Dataset.from_list(rows),
                             eval_dataset=datasets.Dataset.from_list(rows))
    expected = trainer.evaluate()
    model, got = validate(policy_dir, reference_dir, pairs_jsonl, len(rows), tmp_path)
    assert model.router_aux_coef == 0.5 and not model.share_prefix
    assert expected["eval_aux_loss"] > 0.5  # 0.5 x aux moves the loss well beyond the tolerance
    for name in ("aux_loss", "loss", "rewards/margins", "logps/chosen", "logits/rejected"):
        assert got[f"val/{name}"] == pytest.approx(expected[f"eval_{name}"], abs=1e-5), name


@pytest.mark.parametrize("model_type", ["mixtral", "granitemoe"])
def test_aux_loss_gradients_equal_the_models_own_forward(tmp_path, pairs_jsonl, model_type):
    # ours: hidden states kept by a hook, the head on response positions only, the aux loss from a forward that
    # builds the last position's logits; independent: the model's full logits and its own aux_loss
    policy_dir = save_moe(tmp_path, model_type, 0)
    dm = PreferenceDataModule(train_path=pairs_jsonl, tokenizer_name_or_path=policy_dir, batch_size=4,
                              cache_dir=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = dpo_module(policy_dir, reference_free=True, router_aux_loss_coef=0.3)
    module.configure_model()
    policy = module.policy  # fp32: the experts' grouped matmul takes no fp64
    x, out = module.pair_logps(batch)
    loss = -torch.nn.functional.logsigmoid(x.policy_chosen_logps - x.policy_rejected_logps).mean() \
        + 0.3 * out.aux_loss
    loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    full = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    logps = sequence_logps(full.logits, batch["input_ids"], batch["loss_mask"]).chunk(2)
    expected = -torch.nn.functional.logsigmoid(logps[0] - logps[1]).mean() + 0.3 * full.aux_loss
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.aux_loss.item() == pytest.approx(full.aux_loss.item(), abs=1e-6)
    routers = [n for n in ours if "gate.weight" in n or "router" in n]
    assert routers and all(ours[n].abs().sum() > 0 for n in routers)  # the aux loss trains the routers
    for n, p in policy.named_parameters():
        assert torch.allclose(ours[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_coefficient_zero_leaves_the_aux_loss_out_and_shares_prefixes(tmp_path, pairs_jsonl):
    policy_dir, reference_dir = save_moe(tmp_path, "mixtral", 0), save_moe(tmp_path, "mixtral", 1)
    with_aux = validate(policy_dir, reference_dir, pairs_jsonl, 8, tmp_path)[1]
    model, without = validate(policy_dir, reference_dir, pairs_jsonl, 8, tmp_path, router_aux_loss_coef=0.0)
    assert model.router_aux_coef == 0.0 and model.share_prefix
    assert "val/aux_loss" not in without
    assert without["val/loss"] == pytest.approx(with_aux["val/loss"] - 0.5 * with_aux["val/aux_loss"], abs=1e-5)


def test_a_coefficient_for_a_model_without_a_router_is_refused(tiny_model_dir):
    module = dpo_module(tiny_model_dir, router_aux_loss_coef=0.01, precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="router_aux_loss_coef is 0.01, but LlamaForCausalLM is not a mixture"):
        module.configure_model()


def test_lora_fit_logs_the_aux_loss_and_moves_only_adapters(tmp_path, pairs_jsonl):
    # through the PEFT wrapper: the hook on the backbone, logits_to_keep and output_router_logits reach the model
    from lightning.pytorch import Callback, Trainer

    pytest.importorskip("peft")
    policy_dir = save_moe(tmp_path, "mixtral", 0)
    dm = PreferenceDataModule(train_path=pairs_jsonl, val_path=pairs_jsonl, tokenizer_name_or_path=policy_dir,
                              batch_size=2, cache_dir=None)
    model = dpo_module(policy_dir, use_peft=True, lora_r=4, router_aux_loss_coef=0.2,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.5))

    class Start(Callback):
        def on_train_start(self, trainer, module):
            self.weights = {n: p.detach().clone() for n, p in module.policy.named_parameters()}

    start = Start()
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, max_steps=2, accumulate_grad_batches=2,
                      limit_val_batches=1, callbacks=[start])
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    assert metrics["train/aux_loss"] > 0 and metrics["val/aux_loss"] > 0
    assert not model.share_prefix
    trained = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    after = dict(model.policy.named_parameters())
    assert any(not torch.equal(start.weights[n], after[n]) for n in trained)  # the adapters moved
    assert all(torch.equal(w, after[n]) for n, w in start.weights.items() if "lora_" not in n)  # nothing else did
