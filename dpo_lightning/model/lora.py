"""LoRA through ``peft`` (optional extra ``dpo_lightning[lora]``): adapters on the policy, the reference is the same
model with its adapters switched off, and the export is either merged plain weights or the adapter alone."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from torch import Tensor, nn


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("model.use_peft needs the optional dependency peft: pip install 'dpo_lightning[lora]'") \
            from None
    return peft


def is_peft_model(model: Optional[nn.Module]) -> bool:
    return model is not None and hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float,
               target_modules: Optional[list[str]] = None) -> nn.Module:
    """Wrap a causal LM in trainable LoRA adapters; every base weight is frozen. ``target_modules`` None means
    every linear layer except the output head (peft's ``all-linear``). Adapters start at zero (``lora_B`` = 0), so
    the wrapped model computes exactly what the base does until the first step."""
    peft = require_peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                             target_modules=target_modules or "all-linear")
    return peft.get_peft_model(model, config)


def adapters_disabled(model: nn.Module) -> AbstractContextManager:
    """The base model, for the block's duration: the DPO reference without a second copy in memory."""
    return model.disable_adapter()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The base model's state dict, in its own key names, with each active adapter's delta ``B @ A * scale`` added
    to the weight it adapts; the model itself is not changed (unlike peft's ``merge_and_unload``), so training or
    probing can go on after the export. One delta at a time is held besides the weights."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {f"{name}.base_layer.weight": module for name, module in base.named_modules()
              if isinstance(module, LoraLayer) and not module.merged}
    state: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue  # adapter weights: folded into the weight they adapt
        layer = layers.get(key)
        for adapter in layer.active_adapters if layer is not None else ():
            if adapter in layer.lora_A:
                value = value + layer.get_delta_weight(adapter).to(value.dtype)  # (out, in)
        state[key.replace(".base_layer.", ".")] = value
    return state
