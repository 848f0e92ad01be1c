"""Fail early on bad configs, atomic checkpoint and export writes, and the safety defaults."""

import inspect
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

import dpo_lightning.training.checkpoint_io as checkpoint_io
from dpo_lightning.cli import cli_main
from dpo_lightning.data import datamodule
from dpo_lightning.eval import compare
from dpo_lightning.model import loading
from dpo_lightning.model.saving import save_policy
from dpo_lightning.pairs import build, rewards
from dpo_lightning.training import export, module
from dpo_lightning.training.checkpoint_io import AtomicCheckpointIO
from dpo_lightning.training.export import export_checkpoint

from conftest import fit_args, fit_tiny

BATCH_1 = "--data.batch_size=1"  # one pair a step: 6 steps an epoch


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if any model or tokenizer is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("extra, key", [
    (["--model.loss.betta=0.2"], "betta"),  # unknown key
    (["--data.batch_sise=4"], "batch_sise"),
    (["--model.loss.beta=high"], "model.loss.beta"),  # wrong type
    (["--data.on_bad_row=ignore"], "on_bad_row"),
    (["--trainer.max_epochs=two"], "trainer.max_epochs"),
])
def test_bad_config_keys_and_types_stop_before_any_model_loads(no_model_loading, tiny_model_dir, pairs_jsonl,
                                                                tmp_path, capsys, extra, key):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(fit_args(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, *extra))
    assert exit_info.value.code != 0
    assert key in capsys.readouterr().err


def test_unknown_key_in_a_config_file_is_named(no_model_loading, tiny_model_dir, pairs_jsonl, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  loss:\n    beta: 0.1\n    los_type: ipo\n")
    with pytest.raises(SystemExit):
        cli_main(fit_args(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, "--config", str(config)))
    assert "los_type" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--data.max_length=64", "--data.max_prompt_length=64"], "data.max_prompt_length"),
    (["--model.loss.loss_type=[sigmoid,sft]", "--model.loss.loss_weights=[1.0]"], "model.loss.loss_weights"),
    (["--model.loss.beta=-1"], "model.loss.beta"),
    (["--model.loss.label_smoothing=0.7"], "model.loss.label_smoothing"),
    (["--data.val_fraction=1.0"], "data.val_fraction"),
])
def test_impossible_combinations_stop_before_any_model_loads(no_model_loading, tiny_model_dir, pairs_jsonl, tmp_path,
                                                             extra, message):
    with pytest.raises(ValueError, match=message):
        cli_main(fit_args(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, *extra))


def test_flex_attention_training_on_cpu_is_refused_with_the_kernel_to_use(tiny_model_dir, pairs_jsonl, tmp_path):
    with pytest.raises(ValueError, match="flex_attention trains on CUDA only.*use sdpa"):
        fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, "--model.attn_implementation=flex_attention")


class _Interrupted(Exception):
    pass


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_checkpoint(tiny_model_dir, pairs_jsonl, tmp_path,
                                                                         monkeypatch):
    real_save, saves = torch.save, []

    def save_then_die(obj, f, *args, **kwargs):  # the third save writes half its bytes, then the process "dies"
        saves.append(obj["global_step"])
        if len(saves) < 3:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise _Interrupted

    monkeypatch.setattr(checkpoint_io.torch, "save", save_then_die)
    with pytest.raises(_Interrupted):
        fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, "--checkpoint.every_n_train_steps=1",
                 "--export.enabled=false")
    ckpt_dir = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert os.listdir(ckpt_dir) == ["last.ckpt"]  # no temporary file left behind
    checkpoint = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == saves[1] == 2
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])


def test_a_checkpoint_write_that_fails_names_the_file_and_the_space_and_keeps_the_previous(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    weights = {"state_dict": {"w": torch.zeros(256, 256)}, "optimizer_states": [{"m": [torch.zeros(256)]}]}
    io.save_checkpoint({**weights, "global_step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):  # what torch raises when the disk fills during the write
        f.write(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1024 vs 900")

    monkeypatch.setattr(checkpoint_io.torch, "save", full_disk)
    assert checkpoint_io.tensor_bytes(weights) == (256 * 256 + 256) * 4 == 263168
    with pytest.raises(OSError, match=rf"writing the checkpoint {path} failed \(.*unexpected pos.*\); the previous "
                                      r"one, if any, is kept. It needs about 0.25 MB, the disk holding it has "
                                      r"\d+\.\d\d [MG]B free"):
        io.save_checkpoint({**weights, "global_step": 2}, path)
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 1

    def no_permission(obj, f, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint_io.torch, "save", no_permission)  # not a matter of space: none is quoted
    with pytest.raises(OSError, match=r"Permission denied\); the previous one, if any, is kept$"):
        io.save_checkpoint({**weights, "global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_the_cli_writes_checkpoints_through_the_atomic_writer(tiny_model_dir, pairs_jsonl, tmp_path):
    cli, _ = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, "--trainer.max_epochs=1", "--trainer.max_steps=1",
                      "--export.enabled=false")
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_an_export_killed_halfway_leaves_the_previous_export(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path / "hf_model"
    save_policy(model, tok, str(out))
    before = load_file(out / "model.safetensors")

    class DiesWhileSaving:
        def save_pretrained(self, path):
            (tmp_path / "marker").write_text(path)
            with open(os.path.join(path, "tokenizer.json"), "w") as f:
                f.write("{half")
            raise _Interrupted

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(_Interrupted):
        save_policy(model, DiesWhileSaving(), str(out))
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the old export, whole
    assert AutoTokenizer.from_pretrained(out) is not None
    assert sorted(os.listdir(tmp_path)) == ["hf_model", "marker"]  # the half-written directory is gone


def test_an_export_refuses_a_directory_it_would_destroy(tiny_model_dir, pairs_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = sorted(os.listdir(tiny_model_dir))
    with pytest.raises(ValueError, match="which the export is made from"):  # the folder the policy came from
        save_policy(model, tok, tiny_model_dir)
    assert sorted(os.listdir(tiny_model_dir)) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt, which an export does not write"):
        save_policy(model, tok, str(mine))
    assert os.listdir(mine) == ["notes.txt"] and not any(n.startswith(".mine") for n in os.listdir(tmp_path))

    _, run = fit_tiny(tmp_path / "fit", tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=1", "--trainer.max_steps=1")
    ckpt = run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="which the export is made from"):  # export into the checkpoint's folder
        export_checkpoint(str(ckpt), str(ckpt.parent))
    assert ckpt.exists()
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        export_checkpoint(str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))
    export_checkpoint(str(ckpt), str(run / "hf_model"))  # an earlier export is replaced
    with pytest.raises(ValueError, match="notes.txt, which an export does not write"):  # refused before training
        fit_tiny(tmp_path / "fit2", tiny_model_dir, pairs_jsonl, "--trainer.max_epochs=1", "--trainer.max_steps=1",
                 f"--export.dirpath={mine}")
    assert not (tmp_path / "fit2" / "lightning_logs" / "version_0" / "checkpoints").exists()


def test_trust_remote_code_is_off_by_default_everywhere():
    entry_points = [module.DPOModule.__init__, datamodule.PreferenceDataModule.__init__, build.build_pairs,
                    compare.compare, export.export_checkpoint, rewards.SequenceClassifierReward.__init__]
    for fn in entry_points:
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__qualname__


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_load_weights_only_and_pickled_code_is_refused(tiny_model_dir, pairs_jsonl, tmp_path):
    _, run = fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, "--trainer.max_epochs=1", "--trainer.max_steps=2")
    assert (run / "hf_model" / "model.safetensors").exists()
    assert not list((run / "hf_model").glob("*.bin"))  # weights as safetensors only
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.load(ckpt, weights_only=True)  # a dpo_lightning checkpoint is plain tensors and containers
    evil = tmp_path / "evil.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["payload"] = Payload()
    with open(evil, "wb") as f:
        pickle.dump(checkpoint, f)  # not even a torch zip file: plain pickle with a code-running reduce
    torch.save({**torch.load(ckpt, weights_only=True), "payload": Payload()}, tmp_path / "evil2.ckpt")
    for path in (evil, tmp_path / "evil2.ckpt"):
        with pytest.raises(RuntimeError, match="refusing to unpickle"):
            export_checkpoint(str(path), str(tmp_path / "out"))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        fit_tiny(tmp_path, tiny_model_dir, pairs_jsonl, BATCH_1, f"--ckpt_path={tmp_path / 'evil2.ckpt'}")
