"""The real command line on a tiny model: fit, validate, export, help, every shipped config, every loss."""

import glob
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning.cli import DPOLightningCLI, cli_main, section_hints
from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.losses import LOSSES
from dpo_lightning.training.module import DPOModule

from conftest import ROOT, TB_METRICS, fit_args, fit_tiny, run_cli, scalar_tags


def test_fit_then_validate_then_export(tiny_model_dir, pairs_jsonl, tmp_path):
    def args(subcommand, *extra):
        return fit_args(tmp_path, tiny_model_dir, pairs_jsonl, *extra, subcommand=subcommand,
                        cache_dir=tmp_path / "cache")

    out = run_cli(args("fit", "--data.group_by_length=true"), cwd=tmp_path)
    assert "6 read, 6 kept" in out and "2 read, 2 kept" in out  # one summary line per split
    assert "of token slots are padding in the plain layout" in out
    assert "in the prefix-shared one (data.group_by_length: true)" in out
    fit_dir = tmp_path / "lightning_logs" / "version_0"
    tags, acc = scalar_tags(str(fit_dir))
    for name in TB_METRICS:
        assert f"train/{name}" in tags and f"val/{name}" in tags, name
    assert any(t.startswith("lr-") for t in tags)
    assert {f"throughput/{n}" for n in ("pairs_per_sec", "tokens_per_sec", "padding_share", "step_time")} <= tags
    assert len(acc.Scalars("train/loss")) >= 2

    # the exported policy loads with plain transformers, differs from the start and generates
    export = fit_dir / "hf_model"
    assert (export / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(export)
    trained = AutoModelForCausalLM.from_pretrained(export)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    ids = tok.apply_chat_template([{"role": "user", "content": "who are you ?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    generated = trained.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]

    # validate the trained checkpoint, and the untrained policy (ln 2, zero rewards)
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    run_cli(args("validate", f"--ckpt_path={ckpt}"), cwd=tmp_path)
    tags, acc = scalar_tags(str(tmp_path / "lightning_logs" / "version_1"))
    assert {f"val/{m}" for m in TB_METRICS} <= tags
    trained_val_loss = acc.Scalars("val/loss")[-1].value
    run_cli(args("validate"), cwd=tmp_path)
    _, acc = scalar_tags(str(tmp_path / "lightning_logs" / "version_2"))
    assert acc.Scalars("val/loss")[-1].value == pytest.approx(0.693147, abs=1e-5)
    assert acc.Scalars("val/rewards/margins")[-1].value == pytest.approx(0.0, abs=1e-6)
    assert trained_val_loss < 0.693

    # any checkpoint converts to a transformers directory equal to the end-of-fit export
    run_cli(["export", f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'from_ckpt'}"], cwd=tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "from_ckpt")
    for (k, a), b in zip(trained.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), k
    assert (tmp_path / "from_ckpt" / "tokenizer.json").exists()


def test_help_shows_every_setting_with_its_doc():
    proc = subprocess.run([sys.executable, "-m", "dpo_lightning", "fit", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0
    for flag, doc in [("--model.loss.beta", "strength of the KL penalty"), ("--data.max_length", "prompt + response"),
                      ("--model.loss.loss_type", "sigmoid"), ("--export.dirpath", "hf_model"),
                      ("--trainer.accumulate_grad_batches", ""), ("--trainer.precision", "")]:
        assert flag in proc.stdout, flag
        assert doc in proc.stdout, doc
    assert proc.stdout.startswith("usage: python -m dpo_lightning [options] fit")
    for command in ("iterate", "build-pairs"):  # the tools' usage names the command as it is typed
        proc = subprocess.run([sys.executable, "-m", "dpo_lightning", command, "--help"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m dpo_lightning {command}"), command


def test_a_problem_with_the_input_is_one_line_and_the_traceback_on_request(tiny_model_dir, tmp_path):
    args = fit_args(tmp_path, tiny_model_dir, tmp_path / "missing.jsonl")
    for extra, traceback in (({}, False), ({"DPO_LIGHTNING_TRACEBACK": "1"}, True)):
        proc = subprocess.run([sys.executable, "-m", "dpo_lightning", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT, **extra}, cwd=tmp_path, timeout=300)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-2 if not traceback else -1]
        assert last.endswith(f"{tmp_path / 'missing.jsonl'}: file not found")
        assert last.startswith("error: ") != traceback and ("Traceback" in proc.stderr) == traceback


@pytest.mark.parametrize("config", sorted(c for c in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
                                           if not c.endswith("_fsdp.yaml")  # FSDP overlays: test_fsdp.py
                                           and not os.path.basename(c).startswith("iterate_")))  # test_iterate.py
def test_every_shipped_config_parses_and_instantiates(config):
    cli = DPOLightningCLI(DPOModule, PreferenceDataModule, run=False, auto_configure_optimizers=False,
                          args=["--config", config, "--trainer.logger=false"])
    assert isinstance(cli.model, DPOModule) and cli.model.policy is None  # no weights loaded by parsing
    assert cli.datamodule.hparams.tokenizer_name_or_path == cli.model.hparams.model_name_or_path


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_from_the_cli(loss, tiny_model_dir, pairs_jsonl, tmp_path):
    cli, _ = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, f"--model.loss.loss_type={loss}", "--trainer.max_epochs=1",
                      "--export.enabled=false", "--trainer.enable_model_summary=false",
                      *(["--model.loss.label_smoothing=0.001"] if loss == "exo_pair" else []))
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert "val/rewards/margins" in metrics
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert any(not torch.equal(w, base[k]) for k, w in cli.model.policy.state_dict().items())  # the loss trained


def test_loss_mix_logs_each_term_and_test_subcommand(tiny_model_dir, pairs_jsonl, tmp_path):
    mix = ["--model.loss.loss_type=[sigmoid, sft]", "--model.loss.loss_weights=[1.0, 0.5]", "--export.enabled=false"]
    cli, _ = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *mix, "--trainer.max_epochs=1")
    m = cli.trainer.callback_metrics
    assert m["val/loss"].item() == pytest.approx(m["val/loss/sigmoid"].item() + 0.5 * m["val/loss/sft"].item(),
                                                 rel=1e-5)
    assert "train/loss/sft" in m
    cli = cli_main(fit_args(tmp_path, tiny_model_dir, pairs_jsonl, *mix, subcommand="test"))
    assert {"test/loss", "test/rewards/margins", "test/loss/sft"} <= set(cli.trainer.callback_metrics)


def test_ddp_validation_metrics_equal_one_process(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path):
    """2 CPU processes (gloo), each on its own half of the validation pairs, log what one process logs."""
    values = []
    for n, run_dir in ((1, "one"), (2, "two")):
        os.makedirs(tmp_path / run_dir)
        run_cli(fit_args(tmp_path / run_dir, tiny_model_dir, pairs_jsonl, f"--data.val_path={pairs_jsonl}",
                         "--data.val_fraction=0.0", f"--trainer.devices={n}",
                         "--trainer.strategy=" + ("ddp" if n > 1 else "auto"), subcommand="validate",
                         reference_dir=tiny_reference_dir), cwd=tmp_path / run_dir)
        _, acc = scalar_tags(str(tmp_path / run_dir / "lightning_logs" / "version_0"))
        values.append({m: acc.Scalars(f"val/{m}")[-1].value for m in TB_METRICS})
    assert abs(values[0]["rewards/margins"]) > 1e-3
    for m in TB_METRICS:
        assert values[1][m] == pytest.approx(values[0][m], abs=1e-5), m


def test_bf16_mixed_validation_is_close_to_fp32(tiny_model_dir, tiny_reference_dir, pairs_jsonl, tmp_path):
    """bf16 autocast on CPU; log-probs are reduced in fp32. Tolerance: 2e-2 on the loss, 2% on the log-probs."""
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        cli = cli_main(fit_args(tmp_path / precision, tiny_model_dir, pairs_jsonl, "--trainer.logger=false",
                                f"--trainer.precision={precision}", subcommand="validate",
                                reference_dir=tiny_reference_dir))
        out[precision] = {k: v.item() for k, v in cli.trainer.callback_metrics.items()}
    fp32, bf16 = out["32-true"], out["bf16-mixed"]
    assert bf16["val/loss"] == pytest.approx(fp32["val/loss"], abs=2e-2)
    assert bf16["val/logps/chosen"] == pytest.approx(fp32["val/logps/chosen"], rel=2e-2)
    assert bf16["val/logps/chosen"] != fp32["val/logps/chosen"]  # autocast really ran in bf16


def test_true_bf16_weights_train_and_validate_close_to_fp32(tiny_model_dir, tiny_reference_dir, pairs_jsonl,
                                                            tmp_path):
    """bf16 weights (``model.dtype: bfloat16`` with ``bf16-true``): log-probs still reduced in fp32. Tolerance: 5e-2
    on the loss, 3% on the log-probs (bf16 keeps 8 bits of mantissa)."""
    out = {}
    for precision, dtype in (("32-true", "float32"), ("bf16-true", "bfloat16")):
        cli = cli_main(fit_args(tmp_path / precision, tiny_model_dir, pairs_jsonl, f"--model.dtype={dtype}",
                                "--model.reference.precompute_ref_log_probs=false", "--trainer.logger=false",
                                f"--trainer.precision={precision}", subcommand="validate",
                                reference_dir=tiny_reference_dir))
        assert next(cli.model.policy.parameters()).dtype == getattr(torch, dtype)
        out[precision] = {k: v.item() for k, v in cli.trainer.callback_metrics.items()}
    fp32, bf16 = out["32-true"], out["bf16-true"]
    assert bf16["val/loss"] == pytest.approx(fp32["val/loss"], abs=5e-2)
    assert bf16["val/logps/chosen"] == pytest.approx(fp32["val/logps/chosen"], rel=3e-2)
    assert bf16["val/logps/chosen"] != fp32["val/logps/chosen"]

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]] * 2), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "loss_mask": torch.tensor([[0, 0, 1, 1]] * 2)}
    logps = cli.model.pair_logps(batch)[0]
    assert logps.policy_chosen_logps.dtype == torch.float32  # reduced in fp32 from bf16 logits

    cli, _ = fit_tiny(tmp_path / "fit", tiny_model_dir, pairs_jsonl, "--model.dtype=bfloat16",
                      "--trainer.precision=bf16-true", "--trainer.max_steps=3", "--export.enabled=false")
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert cli.trainer.global_step == 3


def test_a_flat_model_setting_is_pointed_to_its_section(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model:\n  model_name_or_path: some/model\n  lora_r: 8\n  reference_name_or_path: ref\n")
    for args, want in (
            (["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--model.beta", "0.3",
              "--model.precompute_ref_log_probs=false"],
             ["--model.beta: the loss settings are a section of the model: model.loss.beta",
              "--model.precompute_ref_log_probs: the reference settings are a section of the model: "
              "model.reference.precompute_ref_log_probs"]),
            (["-c", str(flat)], [f"{flat}: model.lora_r: the lora settings are a section of the model: "
                                 "model.lora.lora_r", f"{flat}: model.reference_name_or_path: the reference settings "
                                 "are a section of the model: model.reference.model_name_or_path"])):
        proc = subprocess.run([sys.executable, "-m", "dpo_lightning", "fit", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT}, cwd=tmp_path, timeout=300)
        assert proc.returncode == 1 and f"error: {'; '.join(want)}" in proc.stderr
    for config in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):  # the shipped ones are all sectioned
        assert section_hints(["fit", "--config", config, "--model.loss.beta=0.1"]) == []


def test_a_fit_without_a_logger_runs(tiny_model_dir, pairs_jsonl, tmp_path):
    cli, _ = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, "--trainer.logger=false", "--trainer.max_steps=1",
                      "--export.enabled=false")
    assert cli.trainer.global_step == 1 and not cli.trainer.loggers


def test_a_fit_without_checkpointing_runs_and_writes_no_checkpoint(tiny_model_dir, pairs_jsonl, tmp_path):
    cli, log_dir = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, "--trainer.enable_checkpointing=false",
                            "--trainer.max_steps=1", "--export.enabled=false")
    assert cli.trainer.global_step == 1 and cli.trainer.checkpoint_callback is None
    assert not (log_dir / "checkpoints").exists()


def test_a_fit_without_validation_data_trains_without_a_warning_about_it(tiny_model_dir, pairs_jsonl, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli, _ = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, "--data.val_fraction=0", "--trainer.max_steps=2",
                          "--export.enabled=false")
    assert cli.trainer.global_step == 2 and sum(cli.trainer.num_val_batches) == 0
    about_validation = r"across ranks|val_dataloader|validation_step|validation loop"
    noise = [str(w.message) for w in caught if re.search(about_validation, str(w.message))]
    assert not noise, noise
