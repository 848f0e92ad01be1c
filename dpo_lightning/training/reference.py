"""The reference policy: the one place that decides where a batch's reference log-probs come from.

Four sources, chosen once in :meth:`Reference.setup`:

* ``free``: none; the losses compare against a uniform reference (log-prob 0). Reference-free losses (SimPO,
  SFT alone) or ``model.reference.reference_free``.
* ``precomputed``: one no-grad pass before training attaches each pair's log-probs to the data module's pairs
  (``reference_cache.py``); batches carry them as ``batch["ref_logps"]`` and no reference is held for the steps.
* ``adapters_off``: with LoRA, the policy with its adapters switched off; no second copy in memory.
* ``model``: a frozen copy loaded from its path, in eval mode, left out of checkpoints (rebuilt from its path),
  unless TR-DPO moves it towards the policy (``sync``), which then keeps it in checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedModel

from ..data.collate import REF_KEY, PreferenceBatch
from ..model.fsdp import is_fsdp
from ..model.lora import adapters_disabled
from .reference_cache import precompute
from .reference_sync import mix_into_reference
from .settings import ReferenceSettings

Source = Literal["free", "precomputed", "adapters_off", "model"]


class Reference(nn.Module):
    """Supplies the frozen reference's log-probs of a batch (``(2B,)``, chosen then rejected).

    Args:
        settings: the ``model.reference`` section.
        policy_path: the policy's weights; the reference's too unless ``settings.model_name_or_path`` is set.
        needed: whether the losses read reference log-probs at all.
        uses_lora: whether the policy carries LoRA adapters.
        load: loads a frozen model from a path, as the policy is loaded (dtype, attention, dropout).
    """

    def __init__(self, settings: ReferenceSettings, policy_path: str, needed: bool, uses_lora: bool,
                 load: Callable[[str], PreTrainedModel]) -> None:
        super().__init__()
        self.settings, self.policy_path, self.uses_lora, self.load = settings, policy_path, uses_lora, load
        self.needed = needed and not settings.reference_free
        self.model: Optional[PreTrainedModel] = None
        self.source: Optional[Source] = None

    @property
    def path(self) -> str:
        """Where the reference weights come from: its own path, else the policy's."""
        return self.settings.model_name_or_path or self.policy_path

    @property
    def shares_policy(self) -> bool:
        """LoRA with no other reference named: the reference is the policy with its adapters off."""
        return self.uses_lora and self.settings.model_name_or_path in (None, self.policy_path)

    @property
    def syncs(self) -> bool:
        return self.settings.sync_ref_model

    def setup(self, policy: nn.Module, trainer: Any, settings_key: list[Any], logps_kwargs: dict[str, Any]) -> None:
        """Choose the source and prepare it: load the model, or attach precomputed log-probs to the data.

        Args:
            policy: the trainable policy (the adapters-off reference; TR-DPO's target).
            trainer: the Lightning trainer, if any; its data module receives precomputed log-probs.
            settings_key: what else changes the reference's values (dtype, attention, precision), for the cache.
            logps_kwargs: ``chunk_size``, ``ld_alpha``, ``prefix_sharing``, ``packing`` and ``row_tokens`` of the
                log-prob pass.
        """
        self._policy = [policy]  # a list: not registered as a submodule
        self._device = trainer.strategy.root_device if trainer is not None else next(policy.parameters()).device
        if self.syncs:
            self._check_sync(trainer)
        if not self.needed:
            self.source = "free"
        elif self._can_precompute(trainer):
            self.source = "precomputed"
            self._settings_key, self._logps_kwargs = settings_key, logps_kwargs
            # a fit without validation leaves the val split to on_validation_start, which a later validate needs
            unvalidated = trainer.state.fn == "fit" and trainer.limit_val_batches == 0
            self.precompute(trainer, ("train",) if unvalidated else ("train", "val"))
        elif self.shares_policy:
            self.source = "adapters_off"
        else:
            self.source = "model"
            self.model = self.load(self.path).eval().requires_grad_(False)

    def _can_precompute(self, trainer: Any) -> bool:
        datamodule = getattr(trainer, "datamodule", None)
        return self.settings.precompute_ref_log_probs and not self.syncs and \
            callable(getattr(datamodule, "attach_reference_logps", None))

    def precompute(self, trainer: Any, splits: tuple[str, ...] = ("train", "val")) -> None:
        """Attach reference log-probs to the data module's ``splits`` that lack them (``reference_cache.py``)."""
        if self.source != "precomputed":
            return
        precompute(trainer, trainer.datamodule, self.open, self.path, self._settings_key, self.settings
                   .precompute_batch_size, splits=splits, **self._logps_kwargs)

    def _check_sync(self, trainer: Any) -> None:
        if not self.needed:
            raise ValueError("model.reference.sync_ref_model: these losses use no reference model, so there is none "
                             "to update")
        if self.uses_lora:  # as in TRL: the reference is the adapters-off policy, or a model of other names
            raise ValueError("model.reference.sync_ref_model does not work with model.lora.use_peft: the reference "
                             "would have to take the adapters' update; train all weights, or turn sync_ref_model off")
        if is_fsdp(trainer):
            raise ValueError("model.reference.sync_ref_model is not supported under FSDP: the policy's and the "
                             "reference's parameters are sharded differently; use DDP")
        if self.settings.precompute_ref_log_probs:
            rank_zero_info("[dpo_lightning] sync_ref_model: the reference changes during training, so its "
                           "log-probs are computed each step (precompute_ref_log_probs ignored)")

    def logps(self, batch: PreferenceBatch, logps_fn: Callable[..., Any], **kwargs: Any) -> Optional[Tensor]:
        """``(2B,)`` reference log-probs of ``batch``; None when the reference is uniform (log-prob 0).
        ``logps_fn(model, input_ids, attention_mask, loss_mask, **kwargs)`` is the policy's own layout."""
        if REF_KEY in batch:
            return batch[REF_KEY]
        if not self.needed:
            return None
        if self.model is None and not self.shares_policy:
            raise RuntimeError("a batch without reference log-probs, and no reference model: with "
                               "model.reference.precompute_ref_log_probs every pair must come from the data module's "
                               "train or validation data")
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        with torch.no_grad(), self.open() as model:
            return logps_fn(model, *inputs, **kwargs).logps

    @contextmanager
    def open(self) -> Iterator[nn.Module]:
        """The frozen reference for one pass: the held model; the policy with its adapters off (LoRA); otherwise
        the reference loaded for this pass only and released afterwards."""
        if self.model is not None:
            yield self.model
        elif self.shares_policy:
            policy = self._policy[0].to(self._device)
            with adapters_disabled(policy):
                yield policy
        else:
            yield self.load(self.path).eval().requires_grad_(False).to(self._device)

    def after_optimizer_step(self, steps_done: int) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` optimizer steps, mix the policy into the reference."""
        if self.syncs and steps_done % self.settings.ref_model_sync_steps == 0:
            mix_into_reference(self.model, self._policy[0], self.settings.ref_model_mixup_alpha)

    def train(self, mode: bool = True) -> "Reference":
        return super().train(False)  # frozen: Lightning's model.train() must not switch it back
