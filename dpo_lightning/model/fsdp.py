"""FSDP helpers: which modules become FSDP units, and a full policy state dict for the export.

Lightning's ``FSDPStrategy`` wraps the whole ``DPOModule``, so the frozen reference is sharded like the policy.
Each decoder layer (policy or reference) is its own unit; the root unit holds both models' embeddings, norms and
heads, trainable and frozen side by side, which needs ``use_orig_params: true`` (``configs/qwen_identity_fsdp.yaml``).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


class DecoderLayerPolicy:
    """FSDP ``auto_wrap_policy``: wrap every module whose class name is in ``layer_classes``.

    Args:
        layer_classes: class names such as ``Qwen2DecoderLayer``. When unset, the names each Hugging Face model
            lists in its ``_no_split_modules`` (its decoder layer class) are used, so one config fits any model.
    """

    def __init__(self, layer_classes: Optional[list[str]] = None) -> None:
        self.layer_classes = set(layer_classes or ())
        self.from_models = not layer_classes

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if self.from_models:  # FSDP visits parents before children: a model is seen before its layers
            self.layer_classes.update(getattr(module, "_no_split_modules", None) or ())
        if recurse:
            return True
        return type(module).__name__ in self.layer_classes


def is_fsdp(trainer: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)


def full_policy_state_dict(trainer: Any) -> Optional[dict]:
    """The policy's full, unsharded weights on global rank 0 (``None`` elsewhere). Every rank must call it."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = trainer.strategy.model
    # gathered on the GPU, then moved to CPU memory; CPU weights are not "offloaded": with CPU parameters,
    # offload_to_cpu=True crashed (SIGSEGV) in torch 2.13's state-dict hook (tests/test_fsdp.py)
    on_gpu = next(model.parameters()).device.type != "cpu"
    config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    if not trainer.is_global_zero:
        return None
    return {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
