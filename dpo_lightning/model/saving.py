"""Saving a policy as a plain ``transformers`` directory (safetensors + tokenizer), replacing the old one whole."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from typing import Optional, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .lora import is_peft_model, merged_state_dict

# what a model's and a tokenizer's save_pretrained write (weights, configs, vocabularies, peft's model card, the
# modelling code of remote-code models): a directory holding only these is an earlier export, safe to replace
EXPORT_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "*.bin",
                "*.bin.index.json", "adapter_config.json", "README.md", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.model", "*.tiktoken", "*.py")


def check_export_target(output_dir: str, sources: Sequence[Optional[str]] = ()) -> None:
    """Refuse an export directory whose replacement would lose something: one that is, or holds, what the export
    is made from (``sources``: the base model's folder, the checkpoint), or that holds anything an export does not
    write (``EXPORT_FILES``). A new or empty directory, or an earlier export, passes."""
    if not os.path.exists(output_dir):
        return
    if not os.path.isdir(output_dir):
        raise ValueError(f"export directory {output_dir}: exists and is not a directory")
    target = os.path.realpath(output_dir)
    for source in sources:
        if source and os.path.exists(source):
            real = os.path.realpath(source)
            if real == target or real.startswith(target + os.sep):
                raise ValueError(f"export directory {output_dir}: it holds {source}, which the export is made from, "
                                 "and an export replaces the whole directory; choose another directory")
    foreign = [name for name in sorted(os.listdir(output_dir))
               if not (os.path.isfile(os.path.join(output_dir, name))
                       and any(fnmatch.fnmatch(name, pattern) for pattern in EXPORT_FILES))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"export directory {output_dir}: it holds {shown}, which an export does not write, and an "
                         "export replaces the whole directory; choose a new or empty directory, or an earlier export")


def absolute_base_path(adapter_config: str) -> None:
    """An adapter's base model given as a local folder relative to the working directory is recorded as an absolute
    path, so the adapter loads from anywhere; a hub id stays as it is."""
    with open(adapter_config, encoding="utf-8") as f:
        config = json.load(f)
    base = config.get("base_model_name_or_path")
    if base and not os.path.isabs(base) and os.path.isdir(base):
        config["base_model_name_or_path"] = os.path.abspath(base)
        with open(adapter_config, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)


def save_policy(policy: PreTrainedModel, tokenizer: Optional[PreTrainedTokenizerBase], output_dir: str,
                state_dict: Optional[dict] = None, adapter: bool = False,
                sources: Sequence[Optional[str]] = ()) -> str:
    """``save_pretrained`` the model (safetensors) and tokenizer to ``output_dir``; returns the directory.

    The files are written to a sibling temporary directory that then replaces ``output_dir``, so an interrupted
    export leaves either the old directory or the new one, never a half-written mix. ``state_dict`` replaces the
    model's own weights (the gathered weights of a sharded model). A peft model is saved as plain weights with its
    adapters merged (``adapter=False``) or as the adapter alone (``adapter=True``). A directory that is not an
    earlier export, or that holds ``sources`` or the folder the policy was loaded from, is refused
    (:func:`check_export_target`) before anything is written.
    """
    check_export_target(output_dir, [*sources, getattr(policy, "name_or_path", None)])
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        policy.config.use_cache = True  # turned off for training; generation wants it back
        if is_peft_model(policy) and adapter:
            policy.save_pretrained(tmp, safe_serialization=True)
            absolute_base_path(os.path.join(tmp, "adapter_config.json"))
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
