"""Saving the trained policy as a plain ``transformers`` directory (safetensors + tokenizer)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .fsdp import full_policy_state_dict, is_fsdp
from .lora import apply_lora, is_peft_model, merged_state_dict


def save_policy(policy: PreTrainedModel, tokenizer: Optional[PreTrainedTokenizerBase], output_dir: str,
                state_dict: Optional[dict] = None, adapter: bool = False) -> str:
    """``save_pretrained`` the model (safetensors) and tokenizer to ``output_dir``; returns the directory.

    The files are written to a sibling temporary directory that then replaces ``output_dir``, so an interrupted
    export leaves either the old directory or the new one, never a half-written mix. ``state_dict`` replaces the
    model's own weights (the gathered weights of a sharded model). A peft model is saved as plain weights with its
    adapters merged (``adapter=False``) or as the adapter alone (``adapter=True``).
    """
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        policy.config.use_cache = True  # turned off for training; generation wants it back
        if is_peft_model(policy) and adapter:
            policy.save_pretrained(tmp, safe_serialization=True)
        elif is_peft_model(policy):
            policy.get_base_model().save_pretrained(tmp, safe_serialization=True, state_dict=merged_state_dict(policy))
        else:
            policy.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.replace(output_dir, os.path.join(old, "previous"))
            os.replace(tmp, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


class HFExport(Callback):
    """At the end of ``fit``, save the policy and tokenizer where plain ``transformers`` can load them.

    Args:
        dirpath: output directory; ``<log_dir>/hf_model`` (e.g. ``lightning_logs/version_0/hf_model``) when unset.
        enabled: set to false to skip the export.
    """

    def __init__(self, dirpath: Optional[str] = None, enabled: bool = True) -> None:
        self.dirpath, self.enabled = dirpath, enabled
        self.saved_to: Optional[str] = None
        self.written: list[str] = []  # what this process wrote: only global rank 0 writes

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        dirpath = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")
        state = full_policy_state_dict(trainer) if is_fsdp(trainer) else None  # a collective: every rank
        if trainer.is_global_zero:
            datamodule = getattr(trainer, "datamodule", None)
            tokenizer = getattr(datamodule, "tokenizer", None)
            adapter = getattr(pl_module.hparams, "lora_export", "merged") == "adapter"
            save_policy(pl_module.policy, tokenizer, dirpath, state, adapter=adapter)
            self.written.append(dirpath)
            rank_zero_info(f"[dpo_lightning] exported the trained policy to {dirpath}")
        self.saved_to = dirpath
        trainer.strategy.barrier("hf_export")


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:  # plain tensors and containers only: no pickled code runs
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - explain and refuse rather than fall back silently
        raise RuntimeError(f"{path}: could not be read as a weights-only checkpoint ({safe_error}). Checkpoints "
                           "written by dpo_lightning load this way; refusing to unpickle arbitrary objects.") from None


def export_checkpoint(ckpt_path: str, output_dir: str, model_name_or_path: Optional[str] = None,
                      tokenizer_name_or_path: Optional[str] = None, trust_remote_code: bool = False) -> str:
    """Convert a dpo_lightning checkpoint (``.ckpt``) into a ``save_pretrained`` directory.

    Args:
        ckpt_path: the Lightning checkpoint, e.g. ``lightning_logs/version_0/checkpoints/last.ckpt``.
        output_dir: where to write ``config.json``, ``model.safetensors`` and the tokenizer.
        model_name_or_path: the model the run started from; read from the checkpoint when unset.
        tokenizer_name_or_path: tokenizer to save alongside; the run's tokenizer when unset.
        trust_remote_code: allow modelling code from the model repository to run.
    """
    checkpoint = _load_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {})
    base = model_name_or_path or hparams.get("model_name_or_path")
    if base is None:
        raise ValueError(f"{ckpt_path}: no model_name_or_path in the checkpoint; pass --model_name_or_path")
    state = {k[len("policy."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    if not state:
        raise ValueError(f"{ckpt_path}: the checkpoint holds no policy weights")
    if hparams.get("use_peft"):  # the checkpoint holds the adapters; the frozen base comes from its path
        policy = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code,
                                                      dtype=next(iter(state.values())).dtype)
        policy = apply_lora(policy, hparams.get("lora_r", 16), hparams.get("lora_alpha", 32.0),
                            hparams.get("lora_dropout", 0.0), hparams.get("lora_target_modules"))
        result = policy.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"{ckpt_path}: the adapter weights do not fit {base}: unexpected "
                             f"{result.unexpected_keys[:5]}, missing {missing[:5]}")
    else:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
        policy = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        try:
            policy.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{ckpt_path}: the policy weights do not fit {base}: {e}") from None
        policy = policy.to(next(iter(state.values())).dtype)
    tok_path = tokenizer_name_or_path or checkpoint.get("datamodule_hyper_parameters", {}).get(
        "tokenizer_name_or_path", base)
    tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
    save_policy(policy, tokenizer, output_dir, adapter=hparams.get("lora_export") == "adapter")
    print(f"[dpo_lightning] wrote {output_dir} from {ckpt_path}")
    return output_dir
