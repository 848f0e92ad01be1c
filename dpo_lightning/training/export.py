"""The trained policy as a plain ``transformers`` directory: at the end of ``fit`` (:class:`HFExport`), or from
any checkpoint (``export``)."""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, AutoModelForCausalLM

from ..model.fsdp import full_policy_state_dict, is_fsdp
from ..model.loading import load_tokenizer
from ..model.lora import apply_lora
from ..model.saving import check_export_target, save_policy
from .settings import as_settings


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

    def _dirpath(self, trainer: Trainer) -> str:
        return self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        # refuse a directory the export would destroy before training; every rank checks (trainer.log_dir is a
        # broadcast), so that all of them stop together
        check_export_target(self._dirpath(trainer), [pl_module.hparams.get("model_name_or_path")])

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.interrupted:
            return
        dirpath = self._dirpath(trainer)
        state = full_policy_state_dict(trainer) if is_fsdp(trainer) else None  # a collective: every rank
        if trainer.is_global_zero:
            datamodule = getattr(trainer, "datamodule", None)
            tokenizer = getattr(datamodule, "tokenizer", None)
            adapter = pl_module.lora_settings.lora_export == "adapter"
            save_policy(pl_module.policy, tokenizer, dirpath, state, adapter=adapter,
                        sources=[pl_module.hparams.get("model_name_or_path")])
            self.written.append(dirpath)
            rank_zero_info(f"[dpo_lightning] exported the trained policy to {dirpath}")
        self.saved_to = dirpath
        trainer.strategy.barrier("hf_export")


def _load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
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
    check_export_target(output_dir, [ckpt_path, model_name_or_path, tokenizer_name_or_path])
    checkpoint = _load_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {})
    base = model_name_or_path or hparams.get("model_name_or_path")
    if base is None:
        raise ValueError(f"{ckpt_path}: no model_name_or_path in the checkpoint; pass --model_name_or_path")
    state = {k[len("policy."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("policy.")}
    if not state:
        raise ValueError(f"{ckpt_path}: the checkpoint holds no policy weights")
    lora = as_settings("lora", hparams.get("lora"))
    if lora.use_peft:  # the checkpoint holds the adapters; the frozen base comes from its path
        policy = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code,
                                                      dtype=next(iter(state.values())).dtype)
        policy = apply_lora(policy, lora.lora_r, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules)
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
    tokenizer = load_tokenizer(tok_path, trust_remote_code=trust_remote_code)
    save_policy(policy, tokenizer, output_dir, adapter=lora.lora_export == "adapter",
                sources=[ckpt_path, base, tok_path])
    print(f"[dpo_lightning] wrote {output_dir} from {ckpt_path}")
    return output_dir
