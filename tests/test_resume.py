"""A run killed mid-epoch and resumed from its last checkpoint ends where an uninterrupted run ends."""

import os

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from dpo_lightning.cli import cli_main

from conftest import fit_args, fit_tiny, scalar_tags


class KillAt(Callback):
    """Simulates a crash: raises before the batch that would make optimizer step ``step + 1``."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


# 6 training pairs, one a step, 2 epochs, a checkpoint after every step
RUN = ["--data.val_fraction=0.25", "--data.batch_size=1", "--trainer.max_epochs=2", "--trainer.limit_val_batches=1",
       "--model.optimizer.lr=1e-2", "--checkpoint.every_n_train_steps=1"]


@pytest.mark.parametrize("kill_step", [3, 8])  # mid first epoch; mid second epoch (6 batches per epoch)
def test_killed_run_resumes_to_the_same_weights_and_metrics(tiny_model_dir, pairs_jsonl, tmp_path, kill_step):
    fit_tiny(tmp_path / "a", tiny_model_dir, pairs_jsonl, *RUN)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_tiny(tmp_path / "b", tiny_model_dir, pairs_jsonl, *RUN, "--trainer.callbacks+=test_resume.KillAt",
                 f"--trainer.callbacks.step={kill_step}")
    last = tmp_path / "b" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == kill_step
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    fit_tiny(tmp_path / "b", tiny_model_dir, pairs_jsonl, *RUN, f"--ckpt_path={last}")

    straight = load_file(tmp_path / "a" / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors")
    resumed = load_file(tmp_path / "b" / "lightning_logs" / "version_1" / "hf_model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    _, a = scalar_tags(str(tmp_path / "a" / "lightning_logs" / "version_0"))
    _, b = scalar_tags(str(tmp_path / "b" / "lightning_logs" / "version_1"))
    after = {s.step: s.value for s in a.Scalars("train/loss") if s.step >= kill_step}
    assert after and {s.step: s.value for s in b.Scalars("train/loss")} == pytest.approx(after, abs=1e-6)
    assert b.Scalars("val/loss")[-1].value == pytest.approx(a.Scalars("val/loss")[-1].value, abs=1e-6)


def test_accumulation_equals_the_big_batch_with_an_uneven_last_window(tiny_model_dir, pairs_jsonl, tmp_path):
    """6 training pairs: batch 4 steps on [4, 2]; batch 2 x accumulation 2 on [2+2, 2]. Plain SGD, so equal
    weights after the epoch mean equal gradients at every step (Adam would hide a gradient scale)."""
    sgd = ["--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=0.5", "--trainer.max_epochs=1"]
    # length groups are cut by batch size, so grouping is off: the same pairs in both runs' steps
    runs = {"big": ["--data.batch_size=4", "--data.group_by_length=false"],
            "accumulated": ["--data.group_by_length=false", "--data.batch_size=2",
                            "--trainer.accumulate_grad_batches=2"]}
    weights = {}
    for name, extra in runs.items():
        fit_tiny(tmp_path / name, tiny_model_dir, pairs_jsonl, *RUN, *sgd, *extra)  # later flags win
        weights[name] = load_file(tmp_path / name / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors")
    base = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert any(not torch.equal(weights["big"][k], base[k]) for k in base)  # training moved the weights
    for k in base:
        torch.testing.assert_close(weights["accumulated"][k], weights["big"][k], rtol=0, atol=1e-6, msg=k)


def test_a_run_resumed_with_more_epochs_follows_the_longer_schedule(tiny_model_dir, pairs_jsonl, tmp_path):
    def lrs(log_dir):
        _, acc = scalar_tags(log_dir)
        return {e.step: e.value for e in acc.Scalars("lr-AdamW")}

    common = ("--export.enabled=false", "--trainer.log_every_n_steps=1")
    _, straight = fit_tiny(tmp_path / "a", tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=2", *common)
    _, first = fit_tiny(tmp_path / "b", tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=1", *common)
    with pytest.warns(UserWarning, match="this run has"):
        cli_main(fit_args(tmp_path / "b", tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=2", *common,
                          f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}"))
    want, got = lrs(straight), lrs(tmp_path / "b" / "lightning_logs" / "version_1")
    resumed = sorted(step for step in got if step > max(lrs(first)))
    assert resumed and all(got[step] > 0 for step in resumed[:-1])  # it trains: the old schedule had ended at 0
    assert [got[step] for step in resumed] == pytest.approx([want[step] for step in resumed], rel=1e-6)


def test_ckpt_path_last_resumes_the_newest_run_and_names_replaced_settings(tiny_model_dir, pairs_jsonl, tmp_path):
    """``--ckpt_path last`` finds ``version_0``'s checkpoint, though the resumed run logs into ``version_1`` (Lightning
    alone looks only there, finds nothing and trains from scratch); the resumed weights equal a straight run's."""
    fit_tiny(tmp_path / "a", tiny_model_dir, pairs_jsonl, *RUN)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_tiny(tmp_path / "b", tiny_model_dir, pairs_jsonl, *RUN, "--trainer.callbacks+=test_resume.KillAt",
                 "--trainer.callbacks.step=3")
    # a setting given on the command line that the checkpoint's hyperparameters replace is named, not dropped silently
    replaced = r"the checkpoint's model settings are used.*model\.loss\.beta 0\.1 \(given 0\.5\)"
    with pytest.warns(UserWarning, match=replaced):
        fit_tiny(tmp_path / "b", tiny_model_dir, pairs_jsonl, *RUN, "--ckpt_path=last", "--model.loss.beta=0.5")
    straight = load_file(tmp_path / "a" / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors")
    resumed = load_file(tmp_path / "b" / "lightning_logs" / "version_1" / "hf_model" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    _, b = scalar_tags(str(tmp_path / "b" / "lightning_logs" / "version_1"))
    assert min(s.step for s in b.Scalars("train/loss")) >= 3  # it went on from step 3


def test_ckpt_path_last_without_a_checkpoint_says_so_and_trains(tiny_model_dir, pairs_jsonl, tmp_path):
    with pytest.warns(UserWarning, match=r"ckpt_path last: no .*last\.ckpt \(a glob pattern\) of this model and data; "
                                         r"fit starts from model"):
        fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *RUN, "--ckpt_path=last", "--trainer.max_epochs=1")
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_ckpt_path_last_looks_where_the_configured_logger_wrote_and_passes_over_other_runs(tiny_model_dir,
                                                                                          pairs_jsonl, tmp_path):
    """With a CSV logger the checkpoints are under its save_dir/name; a run of other training data is passed over,
    named, even when it is the newest."""
    csv = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'csv'}",
           "--trainer.logger.name=runs", "--export.enabled=false"]
    fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *RUN, *csv, "--trainer.max_steps=2")
    other = tmp_path / "other.jsonl"
    other.write_bytes(open(pairs_jsonl, "rb").read())
    fit_tiny(tmp_path, tiny_model_dir, other, *RUN, *csv, "--trainer.max_steps=1")  # newest, other data
    passed_over = r"passed over .*version_1.*last\.ckpt \(data\.train_path '.*other\.jsonl'\)"
    with pytest.warns(UserWarning, match=passed_over):
        cli, _ = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, *RUN, *csv, "--ckpt_path=last",
                          "--trainer.max_steps=3")
    assert cli.config.fit.ckpt_path == str(tmp_path / "csv" / "runs" / "version_0" / "checkpoints" / "last.ckpt")
    assert cli.trainer.global_step == 3


def test_ckpt_path_last_finds_a_run_without_a_logger_and_never_the_guards_last_good(tmp_path):
    import time

    from dpo_lightning.training.resume import checkpoint_folders, find_last_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("last.ckpt", "last-v1.ckpt", "last_good.ckpt"):  # written in this order: last_good newest
        (folder / name).write_bytes(b"x")
        time.sleep(0.02)
    pattern = checkpoint_folders(str(tmp_path), None, False)
    assert pattern == str(folder)
    assert find_last_checkpoint(pattern) == (str(folder / "last-v1.ckpt"), [])
    assert checkpoint_folders(str(tmp_path), None, [{"class_path": "CSVLogger", "init_args": {
        "save_dir": "/x", "name": "n"}}]) == os.path.join("/x", "n", "*", "checkpoints")
