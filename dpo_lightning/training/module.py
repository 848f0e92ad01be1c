"""DPOModule: the Lightning glue between a trainable policy, its frozen reference, the loss and the metrics."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from transformers import PreTrainedModel

from ..data.collate import PreferenceBatch
from ..losses import PairLogps, combine_losses, wpo_weights
from ..model import lora as lora_module
from ..model.compile import compile_decoder_layers
from ..model.loading import DType, check_attention_trains_on, load_causal_lm
from ..model.logprobs import ResponseLogps, response_logps, router_aux_coef
from ..model.prefix_sharing import choose_layout, shared_prefix_logps
from .accumulation import accumulation_weight
from .checkpoint_io import trim_checkpoint
from .host_memory import ResidentBound, keep_freed_memory
from .metrics import PreferenceMetrics, step_metrics
from .optim import AdamW, WarmupDecayLR, clip_gradients, fit_schedules_to_run
from .reference import Reference
from .settings import CompileSettings, LoraSettings, LossSettings, ReferenceSettings, as_settings, plain

ROUTER_BLOCKS_SHARING = ("the router load-balancing loss counts the tokens of each row of the plain layout "
                         "(model.loss.router_aux_loss_coef: 0 leaves that loss out)")


class DPOModule(LightningModule):
    """Direct Preference Optimization of a Hugging Face causal LM.

    Args:
        model_name_or_path: policy to train: a local directory or a Hugging Face Hub id.
        loss: the loss, its weights and parameters (``model.loss``: TRL's names, e.g. ``beta``, ``loss_type``).
        reference: where the frozen reference's log-probs come from (``model.reference``).
        lora: LoRA adapters instead of full fine-tuning (``model.lora``).
        compile: ``torch.compile`` of the decoder layers (``model.compile``).
        dtype: dtype the weights are loaded in; use ``float32`` with ``bf16-mixed`` precision.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``; the model's default when unset.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        disable_dropout: turn dropout off in policy and reference (as the DPO reference code and TRL do).
        trust_remote_code: allow modelling code from the model repository to run.
        logits_chunk_size: response positions per LM-head chunk; bounds the logits memory.
        prefix_sharing: run each pair as one sequence ``[prompt, chosen, rejected]`` in which the rejected tokens
            see the prompt but not the chosen ones: the prompt is encoded once, the log-probs are the same. Used
            with the ``sdpa`` and ``eager`` attention implementations on the model types verified to give the same
            log-probs (``model/prefix_sharing.py``); elsewhere the plain layout runs.
        packing: also pack several such pairs into one row, with a block-diagonal mask and positions from 0 in each
            pair, so a batch of pairs of mixed lengths runs in fewer rows (``model/packing.py``); the same log-probs.
            Where prefix sharing cannot run, neither can packing, and the plain layout runs.
        packing_row_tokens: tokens per packed row, used when it lays a batch out in fewer positions than rows of its
            longest pair; None: rows of the batch's longest pair, so no row is longer than without packing. Longer
            rows hold more pairs each; with the dense masks of ``sdpa`` and ``eager`` a row's attention costs the
            square of its length.
        optimizer: optimizer factory (default AdamW, lr 1e-6).
        scheduler: learning-rate schedule factory (default linear warmup for 10% of the run, then linear decay).
    """

    def __init__(self, model_name_or_path: str, loss: LossSettings = LossSettings(),
                 reference: ReferenceSettings = ReferenceSettings(), lora: LoraSettings = LoraSettings(),
                 compile: CompileSettings = CompileSettings(), dtype: DType = "float32",
                 attn_implementation: Optional[str] = None, gradient_checkpointing: bool = False,
                 disable_dropout: bool = True, trust_remote_code: bool = False, logits_chunk_size: int = 1024,
                 prefix_sharing: bool = True, packing: bool = False, packing_row_tokens: Optional[int] = None,
                 optimizer: OptimizerCallable = AdamW,
                 scheduler: LRSchedulerCallable = WarmupDecayLR) -> None:
        super().__init__()
        self.loss_settings, self.lora_settings = as_settings("loss", loss), as_settings("lora", lora)
        self.compile_settings = as_settings("compile", compile)
        if self.lora_settings.use_peft:
            lora_module.require_peft()
        if packing_row_tokens is not None and packing_row_tokens < 1:
            raise ValueError(f"model.packing_row_tokens must be at least 1, got {packing_row_tokens}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        for section in ("loss", "reference", "lora", "compile"):  # plain containers: weights-only checkpoints
            self.hparams[section] = plain(self.hparams[section])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.policy: Optional[PreTrainedModel] = None
        self.reference = Reference(as_settings("reference", reference), model_name_or_path,
                                   self.loss_settings.needs_reference, self.lora_settings.use_peft, self._load)
        self.logps_fn: Callable[..., ResponseLogps] = response_logps  # the layout, once configure_model knows it
        self.router_aux_coef = 0.0  # loss.router_aux_loss_coef, once configure_model knows the model
        self.strict_loading = False  # checkpoints leave the reference out; it is rebuilt from its path
        self.metrics = PreferenceMetrics(self.loss_settings.names)
        self.resident_bound: Optional[ResidentBound] = None  # on CPU: keeps the never-trimmed heap bounded

    def _load(self, path: str) -> PreTrainedModel:
        hp = self.hparams
        return load_causal_lm(path, hp.dtype, hp.attn_implementation, hp.trust_remote_code,
                              dropout=not hp.disable_dropout)

    def configure_model(self) -> None:
        if self.policy is not None:  # Lightning may call this more than once
            return
        hp, loss = self.hparams, self.loss_settings
        trainer = self._trainer  # None when the module is used on its own
        if trainer is not None and trainer.strategy.root_device.type == "cpu":
            if trainer.training:
                check_attention_trains_on(hp.attn_implementation, "cpu")
            if keep_freed_memory():  # each step's activations reuse the last step's pages (host_memory.py)
                self.resident_bound = ResidentBound(processes=trainer.world_size // max(trainer.num_nodes, 1))
        self.policy = self._load(hp.model_name_or_path).train()  # from_pretrained returns eval mode
        self.policy.config.use_cache = False
        self.router_aux_coef = router_aux_coef(self.policy, loss.router_aux_loss_coef)
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora_settings.use_peft:
            settings = self.lora_settings
            self.policy = lora_module.apply_lora(self.policy, settings.lora_r, settings.lora_alpha,
                                                 settings.lora_dropout, settings.lora_target_modules)
        self.reference.setup(self.policy, trainer, [hp.dtype, hp.attn_implementation, str(getattr(trainer,
                             "precision", None))], {"chunk_size": hp.logits_chunk_size, "ld_alpha": loss.ld_alpha,
                                                    "prefix_sharing": hp.prefix_sharing, "packing": hp.packing,
                                                    "row_tokens": hp.packing_row_tokens})
        models = [m for m in (self.policy, self.reference.model) if m is not None]
        self.logps_fn = choose_layout(models, hp.prefix_sharing, ROUTER_BLOCKS_SHARING if self.router_aux_coef
                                      else None, explain=True, packing=hp.packing, row_tokens=hp.packing_row_tokens)
        if self.compile_settings.torch_compile:
            for model in models:
                compile_decoder_layers(model, self.compile_settings.torch_compile_backend,
                                       self.compile_settings.torch_compile_mode)

    @property
    def share_prefix(self) -> bool:
        """Whether batches run in the prefix-sharing layout (decided in ``configure_model``)."""
        return getattr(self.logps_fn, "func", self.logps_fn) is shared_prefix_logps

    @property
    def packs(self) -> bool:
        """Whether batches run packed, several pairs to a row (decided in ``configure_model``)."""
        return self.share_prefix and bool(getattr(self.logps_fn, "keywords", {}).get("packing"))

    # ---------------------------------------------------------------------------------------- the step
    def pair_logps(self, batch: PreferenceBatch) -> tuple[PairLogps, ResponseLogps]:
        """Policy and reference log-probs of a batch; also returns the policy's own reduction: logit sums, token
        statistics, the router load-balancing loss when it is on, LD-DPO's unweighted sums when ``ld_alpha`` is set."""
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        logps_fn = functools.partial(self.logps_fn, chunk_size=self.hparams.logits_chunk_size,
                                     ld_alpha=self.loss_settings.ld_alpha)
        # the reference runs first: its no-grad activations are gone before the policy's graph is built
        reference = self.reference.logps(batch, logps_fn)
        router = {"router_aux": True} if self.router_aux_coef else {}  # never with prefix sharing: configure_model
        policy = logps_fn(self.policy, *inputs, token_stats=True, **router)
        reference = torch.zeros_like(policy.logps) if reference is None else reference.to(policy.logps)
        unweighted = None if policy.unweighted_logps is None else policy.unweighted_logps.chunk(2)[0]
        x = PairLogps(*policy.logps.chunk(2), *reference.chunk(2), *policy.tokens.chunk(2), unweighted)
        return x, policy

    def _step(self, batch: PreferenceBatch, stage: str, batch_idx: int = 0) -> Tensor:
        x, policy = self.pair_logps(batch)
        settings = self.loss_settings
        pair_weights = 1.0
        if settings.use_weighting:
            tokens = torch.cat([x.chosen_tokens, x.rejected_tokens]).clamp(min=1).float()  # (2B,)
            pair_weights = wpo_weights(policy.stats.wpo_logps, tokens)
        aux_loss = policy.aux_loss
        loss, terms = combine_losses(x, settings.names, settings.weights, settings.params(), pair_weights,
                                     aux_loss, self.router_aux_coef)
        n_pairs = x.policy_chosen_logps.shape[0]
        values = step_metrics(x, policy, loss, terms, settings.beta, None if aux_loss is None else aux_loss.to(loss))
        self.metrics.log(self, stage, values, n_pairs)
        return accumulation_weight(self._trainer, n_pairs, batch_idx) * loss if stage == "train" else loss

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    # ------------------------------------------------------------------------------------------- hooks
    def on_train_start(self) -> None:
        fit_schedules_to_run(self.trainer)

    def on_train_batch_end(self, *args: Any) -> None:
        if self.resident_bound is not None:
            self.resident_bound.check()

    def on_train_epoch_start(self) -> None:
        self.metrics.reset("train")

    def on_validation_start(self) -> None:
        self.reference.precompute(self._trainer, ("val",))  # after a fit that ran without validation

    def on_validation_epoch_start(self) -> None:
        self.metrics.reset("val")

    def on_test_start(self) -> None:
        self.reference.precompute(self._trainer, ("val",))  # the test loop runs on the validation pairs

    def on_test_epoch_start(self) -> None:
        self.metrics.reset("test")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.reference.after_optimizer_step(self.trainer.global_step + 1)  # Lightning counts it after the hook

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = None
        if self.lora_settings.use_peft and self.policy is not None:  # the frozen base is rebuilt from its path
            trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        trim_checkpoint(checkpoint.get("state_dict", {}), self.reference.syncs, trainable)

    # -------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)
