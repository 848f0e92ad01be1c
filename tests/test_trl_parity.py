"""Loss and every metric equal TRL's DPOTrainer on the same policy, reference and conversational data.

TRL 1.16's DPOConfig defaults to ``bf16=True`` even on CPU, which autocasts its reference forward only; the
comparison turns that off so both sides compute in fp32.
"""

import pytest
from lightning.pytorch import Trainer

from dpo_lightning.data.datamodule import PreferenceDataModule

from conftest import conversational_rows, dpo_module

trl = pytest.importorskip("trl")

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"]


def trl_eval_metrics(policy_dir, reference_dir, rows, tmp_path, loss_type, beta, label_smoothing=0.0,
                     loss_weights=None, **extra):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=len(rows), beta=beta,
                         loss_type=loss_type if isinstance(loss_type, list) else [loss_type],
                         loss_weights=loss_weights, label_smoothing=label_smoothing, report_to="none", use_cpu=True,
                         max_length=None, dataloader_num_workers=0, bf16=False, **extra)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir),
                             ref_model=AutoModelForCausalLM.from_pretrained(reference_dir), args=args,
                             processing_class=tok, train_dataset=datasets.Dataset.from_list(rows),
                             eval_dataset=datasets.Dataset.from_list(rows))
    out = trainer.evaluate()
    return {m: out[f"eval_{m}"] for m in METRICS}


def ours(policy_dir, reference_dir, path, n_rows, tmp_path, loss_type, beta, label_smoothing=0.0,
         loss_weights=None, **extra):
    dm = PreferenceDataModule(train_path=path, val_path=path, tokenizer_name_or_path=policy_dir,
                              batch_size=n_rows, max_length=None, max_prompt_length=None, cache_dir=None)
    model = dpo_module(policy_dir, reference_name_or_path=reference_dir, beta=beta, loss_type=loss_type,
                      label_smoothing=label_smoothing, loss_weights=loss_weights, **extra)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    out = trainer.validate(model, datamodule=dm, verbose=False)[0]
    return {m: out[f"val/{m}"] for m in METRICS}


@pytest.mark.parametrize("loss_type, beta, label_smoothing, loss_weights, extra", [
    ("sigmoid", 0.1, 0.0, None, {}), ("sigmoid", 0.5, 0.0, None, {}), ("ipo", 0.1, 0.0, None, {}),
    ("hinge", 0.2, 0.0, None, {}), ("robust", 0.1, 0.2, None, {}), ("sigmoid_norm", 0.1, 0.0, None, {}),
    ("apo_zero", 0.1, 0.0, None, {}), ("apo_down", 0.1, 0.0, None, {}), ("bco_pair", 0.1, 0.0, None, {}),
    (["sigmoid", "sft"], 0.1, 0.0, [1.0, 0.5], {}), ("exo_pair", 0.1, 1e-3, None, {}), ("nca_pair", 0.2, 0.0, None, {}),
    ("sppo_hard", 0.1, 0.0, None, {}), ("aot", 0.1, 0.1, None, {}), ("aot_unpaired", 0.1, 0.1, None, {}),
    ("discopop", 0.1, 0.0, None, {"discopop_tau": 0.2}),
    ("sigmoid", 0.1, 0.0, None, {"f_divergence_type": "forward_kl"}),
    ("sigmoid", 0.1, 0.0, None, {"f_divergence_type": "js_divergence"}),
    ("hinge", 0.1, 0.0, None, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7}),
    ("ipo", 0.1, 0.0, None, {"f_divergence_type": "js_divergence"}),
    (["exo_pair", "sft"], 0.1, 1e-2, [1.0, 0.3], {"f_divergence_type": "alpha_divergence"}),
    # use_weighting with sft is left out: TRL 1.16 multiplies sft's expanded batch value in place (RuntimeError)
    ("sigmoid", 0.1, 0.0, None, {"use_weighting": True}),
    (["ipo", "exo_pair"], 0.1, 1e-3, [0.5, 1.0], {"use_weighting": True}),
    (["sigmoid", "sft"], 0.1, 0.0, [1.0, 0.5], {"ld_alpha": 0.5}), ("ipo", 0.1, 0.0, None, {"ld_alpha": 0.0}),
])
def test_metrics_match_trl(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path, loss_type, beta,
                           label_smoothing, loss_weights, extra):
    rows = conversational_rows()
    expected = trl_eval_metrics(tiny_model_dir, tiny_reference_dir, rows, tmp_path, loss_type, beta, label_smoothing,
                                loss_weights, **extra)
    got = ours(tiny_model_dir, tiny_reference_dir, pairs_jsonl, len(rows), tmp_path, loss_type, beta,
               label_smoothing, loss_weights, **extra)
    assert abs(expected["rewards/margins"]) > 1e-3  # the reference really differs from the policy
    for m in METRICS:
        assert got[m] == pytest.approx(expected[m], abs=1e-5, rel=1e-6), (m, got[m], expected[m])


def test_token_accuracy_and_entropy_match_trl_on_a_policy_that_predicts_tokens(tiny_model_dir, tiny_reference_dir,
                                                                                pairs_jsonl, tmp_path):
    # the random tiny policy predicts no token (accuracy 0): fit it to the chosen conversations first
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    texts = [tok.apply_chat_template(row["chosen"], tokenize=False) for row in conversational_rows()]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(30):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path / "fitted")
    tok.save_pretrained(tmp_path / "fitted")
    rows = conversational_rows()
    expected = trl_eval_metrics(str(tmp_path / "fitted"), tiny_reference_dir, rows, tmp_path, "sigmoid", 0.1)
    got = ours(str(tmp_path / "fitted"), tiny_reference_dir, pairs_jsonl, len(rows), tmp_path, "sigmoid", 0.1)
    assert 0.2 < expected["mean_token_accuracy"] < 1.0
    for m in METRICS:
        assert got[m] == pytest.approx(expected[m], abs=1e-5, rel=1e-6), (m, got[m], expected[m])
