"""Saving a policy as a plain ``transformers`` directory (safetensors + tokenizer), replacing the old one whole."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .lora import is_peft_model, merged_state_dict


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
