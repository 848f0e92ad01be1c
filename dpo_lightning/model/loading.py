"""The one way models and tokenizers are loaded: training, pair building, probes and ``compare`` all come here."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DType = Literal["float32", "bfloat16", "float16", "auto"]


def check_attention_trains_on(attn_implementation: Optional[str], device_type: str) -> None:
    """Refuse an attention kernel that cannot train on ``device_type`` ("cpu", "cuda")."""
    if attn_implementation == "flex_attention" and device_type == "cpu":
        raise ValueError("model.attn_implementation flex_attention trains on CUDA only: on CPU its backward pass does "
                         "not compile; use sdpa there (packing and prefix sharing work with it)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained``; a tokenizer without a pad token pads with its EOS token (as TRL)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token to pad with: the pad token, else EOS (for tokenizers not loaded by :func:`load_tokenizer`)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_causal_lm(name_or_path: str, dtype: DType = "float32", attn_implementation: Optional[str] = None,
                   trust_remote_code: bool = False, dropout: bool = True,
                   device: Optional[torch.device | str] = None) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` (eval mode); ``dropout=False`` sets every dropout
    probability to 0, as the DPO reference code and TRL do for both models."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code,
                              "dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if not dropout:
        disable_dropout(model)
    return model if device is None else model.to(device)


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def default_device() -> torch.device:
    """Where the inference commands (pair building, ``compare``) run: the first GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
