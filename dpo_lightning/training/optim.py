"""Optimizer and learning-rate schedule defaults for DPO.

Both are plain classes, so YAML can replace them with any ``torch.optim`` class (``class_path``) or tune them
(``--model.optimizer.lr 5e-6``, ``--model.scheduler.warmup_ratio 0.05``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with DPO's usual defaults: lr 1e-6 (TRL's default; Rafailov et al. used 5e-7 to
    1e-6), no weight decay. torch's own default of 1e-3 destroys a pretrained model under DPO.

    ``fused`` None (the default) takes torch's fused kernel wherever every parameter is a plain floating-point
    CPU or CUDA tensor, as Hugging Face's default ``adamw_torch_fused`` does: one kernel per tensor instead of
    a chain of elementwise ops (on CPU torch otherwise loops over the tensors one op at a time). Sharded
    parameters (FSDP2's DTensor) keep torch's own choice.
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, fused: Optional[bool] = None) -> None:
        params = [_group(item) if isinstance(item, dict) else item for item in params]
        if fused is None:
            fused = all(_fusable(p) for p in _tensors(params)) or None
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def _group(group: dict) -> dict:
    """A param-group dict whose ``params`` is a list (a generator would be used up by the fused check)."""
    tensors = group["params"]
    return {**group, "params": [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)}


def _tensors(params: list) -> Iterator[torch.Tensor]:
    """The parameters of a list of tensors or of param-group dicts."""
    for item in params:
        yield from (item["params"] if isinstance(item, dict) else [item])


def _fusable(p: torch.Tensor) -> bool:
    return type(p) in (torch.Tensor, torch.nn.Parameter) and p.dtype.is_floating_point and \
        p.device.type in ("cpu", "cuda")


class WarmupDecayLR(LambdaLR):
    """Linear warmup over ``warmup_ratio`` of the run, then ``decay`` to zero (or ``constant``).

    ``num_training_steps`` is filled in from ``trainer.estimated_stepping_batches`` when training starts
    (:func:`fit_schedules_to_run`) when left unset, also when a checkpoint is resumed: a run resumed with more
    epochs or steps than the checkpoint's follows the longer run's schedule from the resumed step on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_ratio: float = 0.1,
                 decay: Literal["linear", "cosine", "constant"] = "linear",
                 num_training_steps: Optional[int] = None) -> None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.warmup_ratio, self.decay, self.num_training_steps = warmup_ratio, decay, num_training_steps
        self.configured_steps = num_training_steps  # None: the run's length, set when training starts
        super().__init__(optimizer, self._factor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's step and length, but this run's setting of whether the length is the run's."""
        configured = self.configured_steps
        super().load_state_dict(state_dict)
        self.configured_steps = configured
        if configured is not None:
            self.num_training_steps = configured

    def set_total_steps(self, num_training_steps: int) -> None:
        """Set the run length after construction and re-apply the current step's learning rate."""
        self.num_training_steps = num_training_steps
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self._factor(self.last_epoch)

    def _factor(self, step: int) -> float:
        total = self.num_training_steps
        if total is None:  # only reached at construction, before the module sets the total
            return 1.0 if self.warmup_ratio == 0 else 0.0
        warmup = math.ceil(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)  # the first step already moves the weights
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if self.decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def fit_schedules_to_run(trainer: Any) -> None:
    """Give each :class:`WarmupDecayLR` without a length the run's length. Called when training starts, not in
    ``configure_optimizers``: asking for ``estimated_stepping_batches`` there builds the train loader before a
    checkpoint is restored, and a resumed run would then start from the wrong batch."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if not isinstance(scheduler, WarmupDecayLR) or scheduler.configured_steps is not None:
            continue
        total = max(1, int(trainer.estimated_stepping_batches))
        if scheduler.num_training_steps not in (None, total):  # a checkpoint of a run of another length
            rank_zero_warn(f"the resumed checkpoint's schedule ran over {scheduler.num_training_steps} optimizer "
                           f"steps; this run has {total}: the learning rate follows a {total}-step schedule from "
                           f"step {scheduler.last_epoch} on")
        if scheduler.num_training_steps != total:
            scheduler.set_total_steps(total)


def clip_gradients(module: LightningModule, optimizer: torch.optim.Optimizer, gradient_clip_val: Optional[float],
                   gradient_clip_algorithm: Optional[str]) -> None:
    """Lightning's clipping, except for an optimizer that would unscale fp16 gradients inside ``step`` (fused
    AdamW, the default) under mixed precision: Lightning refuses to clip those, under bf16 too, where nothing is
    scaled. Here a scaler (fp16) unscales them first, as Hugging Face Accelerate does (its ``step`` then skips
    its own unscaling and still skips steps whose gradients overflowed), and they are clipped as usual."""
    precision = module.trainer.precision_plugin
    if not gradient_clip_val or not isinstance(precision, MixedPrecision) or \
            not getattr(optimizer, "_step_supports_amp_scaling", False):
        module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        return
    if precision.scaler is not None:
        precision.scaler.unscale_(optimizer)
    if gradient_clip_algorithm == "value":  # the plugin's own clipping, without its refusal
        precision.clip_grad_by_value(optimizer, gradient_clip_val)
    else:
        precision.clip_grad_by_norm(optimizer, gradient_clip_val)
