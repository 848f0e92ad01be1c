"""DPOModule: a trainable policy, a frozen reference, the preference loss and its metrics."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import lora, reference_cache
from .fsdp import is_fsdp
from .compile import compile_decoder_layers
from .data import PreferenceBatch
from .logprobs import ResponseLogps, response_logps
from .losses import (F_DIVERGENCE_LOSSES, LOSSES, REFERENCE_FREE_LOSSES, FDivergence, LossName, LossParams,
                     PairLogps, preference_metrics)
from .optim import AdamW, WarmupDecayLR
from .prefix_sharing import attention_pattern, shared_prefix_logps, sharing_blocker, takes_mask_mapping
from .reference_sync import mix_into_reference

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
           "aux_loss")
STAGES = ("train", "val", "test")


def resolve_router_aux_coef(model: PreTrainedModel, coef: Optional[float]) -> float:
    """The weight of the router load-balancing loss, as TRL chooses it: ``coef`` when set, else the model config's
    ``router_aux_loss_coef`` (0 when it declares none); only mixture-of-experts models return that loss."""
    config = model.config.get_text_config()
    is_moe = hasattr(config, "output_router_logits")
    if coef and not is_moe:
        raise ValueError(f"model.router_aux_loss_coef is {coef}, but {type(model).__name__} is not a "
                         "mixture-of-experts model that returns its router logits: there is no load-balancing loss "
                         "to weight")
    if not is_moe:
        return 0.0
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class DPOModule(LightningModule):
    """Direct Preference Optimization of a Hugging Face causal LM.

    Args:
        model_name_or_path: policy to train: a local directory or a Hugging Face Hub id.
        reference_name_or_path: frozen reference model; defaults to ``model_name_or_path``.
        beta: strength of the KL penalty towards the reference (DPO's beta; IPO's tau).
        loss_type: one loss name or a list of them (see ``losses.LOSSES``), e.g. ``[sigmoid, sft]`` for RPO.
        loss_weights: weight of each loss in ``loss_type``; all 1 when unset.
        label_smoothing: assumed share of flipped preference labels (cDPO for ``sigmoid``, ``robust``, ``aot``,
            ``aot_unpaired``); EXO's epsilon for ``exo_pair`` (must be > 0 there; the paper uses 1e-3).
        simpo_gamma: SimPO's target reward margin gamma (TRL's ``simpo_gamma``).
        dpop_lambda: DPOP's weight on the chosen log-prob falling below the reference.
        discopop_tau: DiscoPOP's temperature (TRL's ``discopop_tau``).
        f_divergence_type: f-DPO's regulariser towards the reference: ``reverse_kl`` (DPO), ``forward_kl``,
            ``js_divergence``, ``alpha_divergence``; the others only with losses of the chosen-minus-rejected score
            (``losses.F_DIVERGENCE_LOSSES``). Rewards stay ``beta`` x log-ratio, as in TRL.
        f_alpha_divergence_coef: alpha of ``alpha_divergence``.
        ld_alpha: LD-DPO (Liu et al. 2024): the tokens of a response past the length of the pair's shorter
            response count ``ld_alpha`` times in the policy's and the reference's log-probs (TRL's ``ld_alpha``):
            less pull towards verbose answers. In [0, 1]; unset is plain DPO (1). The ``sft`` term keeps plain sums.
        use_weighting: weight each pair's loss by the policy's length-normalised probabilities of its two responses
            (WPO, Zhou et al. 2024, Eq. 2; TRL's option of the same name), not with ``aot``/``aot_unpaired``.
        reference_free: compare against a uniform reference (log-prob 0) and load no reference model.
        sync_ref_model: TR-DPO: every ``ref_model_sync_steps`` optimizer steps move the reference towards the
            policy, ``ref <- alpha * policy + (1 - alpha) * ref`` with ``alpha = ref_model_mixup_alpha`` (TRL's
            options of the same names). The reference then changes, so its log-probs are not precomputed
            (``precompute_ref_log_probs`` is ignored) and checkpoints keep it. Not with ``use_peft`` or FSDP.
        ref_model_mixup_alpha: TR-DPO's alpha; 1 replaces the reference by the policy.
        ref_model_sync_steps: optimizer steps between reference updates.
        dtype: dtype the weights are loaded in; use ``float32`` with ``bf16-mixed`` precision.
        attn_implementation: e.g. ``sdpa``, ``eager``, ``flash_attention_2``; the model's default when unset.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        disable_dropout: turn dropout off in policy and reference (as the DPO reference code and TRL do).
        trust_remote_code: allow modelling code from the model repository to run.
        logits_chunk_size: response positions per LM-head chunk; bounds the logits memory.
        precompute_ref_log_probs: compute the reference log-probs of every train and validation pair once, before
            training (cached on disk under ``data.cache_dir``, reused across runs), and never load the reference
            for the steps: less memory, and no reference forward per step (TRL's option of the same name, which is
            off there by default). Without the PreferenceDataModule the reference is loaded as usual.
        precompute_batch_size: pairs per batch of that pass; the data's batch size when unset.
        prefix_sharing: run each pair as one sequence ``[prompt, chosen, rejected]`` in which the rejected tokens
            see the prompt but not the chosen ones: the prompt is encoded once, the log-probs are the same. Used
            with the ``sdpa`` and ``eager`` attention implementations on the model types verified to give the same
            log-probs (``prefix_sharing.VERIFIED_MODEL_TYPES``); elsewhere the plain layout runs. Sliding windows
            are kept (see ``prefix_sharing.py``).
        torch_compile: ``torch.compile`` each decoder layer of the policy and reference (dynamic shapes); the first
            steps are slow while it compiles.
        torch_compile_backend: compiler backend; ``inductor`` when unset.
        torch_compile_mode: e.g. ``max-autotune``; the backend's default when unset.
        router_aux_loss_coef: weight of a mixture-of-experts model's router load-balancing loss, added to the loss
            (TRL's option of the same name): the coefficient in the model config when unset (e.g. Mixtral's
            0.001, Qwen2-MoE's), 0 to leave it out. A mixture-of-experts model with the loss on runs the plain
            layout, not prefix sharing, so the loss counts each row's tokens as TRL's does. An error for a model
            without a router.
        use_peft: train LoRA adapters (needs ``peft``: ``pip install 'dpo_lightning[lora]'``) instead of every
            weight. The reference is then the policy with its adapters switched off: no second copy in memory
            (unless ``reference_name_or_path`` names another model). Checkpoints hold the adapters only.
        lora_r: LoRA rank.
        lora_alpha: LoRA scale numerator (the update is ``alpha / r * B @ A``).
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: module names to adapt, e.g. ``[q_proj, v_proj]``; every linear layer except the
            output head when unset.
        lora_export: what the end-of-fit export writes: ``merged`` (plain ``transformers`` weights with the adapters
            folded in) or ``adapter`` (peft's ``adapter_model.safetensors`` + ``adapter_config.json``).
        optimizer: optimizer factory (default AdamW, lr 1e-6).
        scheduler: learning-rate schedule factory (default linear warmup for 10% of the run, then linear decay).
    """

    def __init__(self, model_name_or_path: str, reference_name_or_path: Optional[str] = None, beta: float = 0.1,
                 loss_type: Union[LossName, list[LossName]] = "sigmoid",
                 loss_weights: Optional[list[float]] = None, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, dpop_lambda: float = 50.0, discopop_tau: float = 0.05,
                 f_divergence_type: FDivergence = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 ld_alpha: Optional[float] = None, use_weighting: bool = False, reference_free: bool = False,
                 sync_ref_model: bool = False,
                 ref_model_mixup_alpha: float = 0.6, ref_model_sync_steps: int = 512,
                 dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
                 attn_implementation: Optional[str] = None, gradient_checkpointing: bool = False,
                 disable_dropout: bool = True, trust_remote_code: bool = False, logits_chunk_size: int = 1024,
                 precompute_ref_log_probs: bool = True, precompute_batch_size: Optional[int] = None,
                 prefix_sharing: bool = True, torch_compile: bool = False,
                 torch_compile_backend: Optional[str] = None, torch_compile_mode: Optional[str] = None,
                 router_aux_loss_coef: Optional[float] = None, use_peft: bool = False, lora_r: int = 16,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.0,
                 lora_target_modules: Optional[list[str]] = None,
                 lora_export: Literal["merged", "adapter"] = "merged",
                 optimizer: OptimizerCallable = AdamW, scheduler: LRSchedulerCallable = WarmupDecayLR) -> None:
        super().__init__()
        self.loss_names: list[str] = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        unknown = [n for n in self.loss_names if n not in LOSSES]
        if unknown or not self.loss_names:
            raise ValueError(f"model.loss_type: unknown loss {unknown or '[]'}; choose from {sorted(LOSSES)}")
        self.loss_weights = [1.0] * len(self.loss_names) if loss_weights is None else list(loss_weights)
        if len(self.loss_weights) != len(self.loss_names):
            raise ValueError(f"model.loss_weights has {len(self.loss_weights)} entries but model.loss_type has "
                             f"{len(self.loss_names)}")
        if beta <= 0:
            raise ValueError(f"model.beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if "exo_pair" in self.loss_names and label_smoothing <= 0:
            raise ValueError("model.loss_type exo_pair needs model.label_smoothing > 0 (EXO's epsilon, the weight of "
                             "the dispreferred label; the paper uses 1e-3): at 0 the loss is infinite")
        unfit = sorted(set(self.loss_names) - F_DIVERGENCE_LOSSES)
        if f_divergence_type != "reverse_kl" and unfit:
            raise ValueError(f"model.f_divergence_type {f_divergence_type!r} works only with the losses "
                             f"{sorted(F_DIVERGENCE_LOSSES)}; {unfit} have no f-divergence form")
        if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"model.ld_alpha must be in [0, 1], got {ld_alpha}")
        if use_weighting and {"aot", "aot_unpaired"} & set(self.loss_names):
            raise ValueError("model.use_weighting (WPO) weights pairs, but aot and aot_unpaired compare sorted batch "
                             "statistics, which belong to no pair")
        if sync_ref_model and not (0.0 < ref_model_mixup_alpha <= 1.0 and ref_model_sync_steps >= 1):
            raise ValueError("model.sync_ref_model needs model.ref_model_mixup_alpha in (0, 1] and "
                             f"model.ref_model_sync_steps >= 1, got {ref_model_mixup_alpha} and {ref_model_sync_steps}")
        if discopop_tau <= 0:
            raise ValueError(f"model.discopop_tau must be positive, got {discopop_tau}")
        if use_peft:
            lora.require_peft()
            if lora_r <= 0:
                raise ValueError(f"model.lora_r must be positive, got {lora_r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss_params = LossParams(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                                      dpop_lambda=dpop_lambda, discopop_tau=discopop_tau,
                                      f_divergence=f_divergence_type, f_alpha=f_alpha_divergence_coef)
        self.policy: Optional[PreTrainedModel] = None
        self.share_prefix = False  # prefix_sharing, once configure_model knows the attention implementation
        self.reference: Optional[PreTrainedModel] = None
        self.router_aux_coef = 0.0  # router_aux_loss_coef, once configure_model knows the model
        self.strict_loading = False  # checkpoints leave the reference out; it is rebuilt from its path
        names = METRICS + tuple(f"loss/{n}" for n in self.loss_names if len(self.loss_names) > 1)
        self.metrics = nn.ModuleDict({
            f"{stage}_metrics": nn.ModuleDict({n.replace("/", "__"): MeanMetric(dist_sync_on_step=stage == "train")
                                  for n in names})
            for stage in STAGES})

    @property
    def needs_reference(self) -> bool:
        return not self.hparams.reference_free and not set(self.loss_names) <= REFERENCE_FREE_LOSSES

    @property
    def shares_reference(self) -> bool:
        """LoRA with no other reference named: the reference is the policy with its adapters off."""
        hp = self.hparams
        return hp.use_peft and hp.reference_name_or_path in (None, hp.model_name_or_path)

    # ------------------------------------------------------------------------------------------ models
    def _load(self, path: str) -> PreTrainedModel:
        hp = self.hparams
        kwargs: dict[str, Any] = {"trust_remote_code": hp.trust_remote_code}
        kwargs["dtype"] = hp.dtype if hp.dtype == "auto" else getattr(torch, hp.dtype)
        if hp.attn_implementation:
            kwargs["attn_implementation"] = hp.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if hp.disable_dropout:
            disable_dropout(model)
        return model

    def configure_model(self) -> None:
        if self.policy is not None:  # Lightning may call this more than once
            return
        self.policy = self._load(self.hparams.model_name_or_path).train()  # from_pretrained returns eval mode
        self.policy.config.use_cache = False
        hp = self.hparams
        self.router_aux_coef = resolve_router_aux_coef(self.policy, hp.router_aux_loss_coef)
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hp.use_peft:
            self.policy = lora.apply_lora(self.policy, hp.lora_r, hp.lora_alpha, hp.lora_dropout,
                                          hp.lora_target_modules)
        if hp.sync_ref_model:
            self._check_reference_sync()
        if self._precomputes_reference:
            trainer = self._trainer
            # a fit without validation leaves the val split to on_validation_start, which a later validate needs
            unvalidated = trainer.state.fn == "fit" and trainer.limit_val_batches == 0
            self._precompute_reference(("train",) if unvalidated else ("train", "val"))
        elif self.needs_reference and not self.shares_reference:
            self.reference = self._load(self.reference_path).eval().requires_grad_(False)
        models = [m for m in (self.policy, self.reference) if m is not None]
        blocker = next((b for b in map(sharing_blocker, models) if b), None)
        if blocker is None and self.router_aux_coef:
            blocker = ("the router load-balancing loss counts the tokens of each row of the plain layout "
                       "(model.router_aux_loss_coef: 0 leaves that loss out)")
        self.share_prefix = hp.prefix_sharing and blocker is None
        if hp.prefix_sharing and blocker:
            rank_zero_info(f"[dpo_lightning] prefix sharing off: {blocker}")
        pattern = attention_pattern(self.policy.config)
        if self.share_prefix and pattern.mixed and not takes_mask_mapping(self.policy):
            rank_zero_info("[dpo_lightning] prefix sharing: this model's layers attend differently (full, and sliding "
                           f"over {pattern.window} tokens); batches with a longer row run in the plain layout")
        if hp.torch_compile:
            for model in (self.policy, self.reference):
                if model is not None:
                    compile_decoder_layers(model, hp.torch_compile_backend, hp.torch_compile_mode)

    def _check_reference_sync(self) -> None:
        if not self.needs_reference:
            raise ValueError("model.sync_ref_model: these losses use no reference model, so there is none to update")
        if self.hparams.use_peft:  # as in TRL: the reference is the adapters-off policy, or a model of other names
            raise ValueError("model.sync_ref_model does not work with use_peft: the reference would have to take the "
                             "adapters' update; train all weights, or turn sync_ref_model off")
        if is_fsdp(self._trainer):
            raise ValueError("model.sync_ref_model is not supported under FSDP: the policy's and the reference's "
                             "parameters are sharded differently; use DDP")
        if self.hparams.precompute_ref_log_probs:
            rank_zero_info("[dpo_lightning] sync_ref_model: the reference changes during training, so its "
                           "log-probs are computed each step (precompute_ref_log_probs ignored)")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        hp = self.hparams
        steps_done = self.trainer.global_step + 1  # Lightning counts this step once the hook has returned
        if hp.sync_ref_model and steps_done % hp.ref_model_sync_steps == 0:
            mix_into_reference(self.reference, self.policy, hp.ref_model_mixup_alpha)

    @property
    def reference_path(self) -> str:
        """Where the reference weights come from: ``reference_name_or_path``, else the policy's own path."""
        return self.hparams.reference_name_or_path or self.hparams.model_name_or_path

    @property
    def _precomputes_reference(self) -> bool:
        hp = self.hparams
        return self.needs_reference and hp.precompute_ref_log_probs and not hp.sync_ref_model and \
            hasattr(getattr(self._trainer, "datamodule", None), "train_pairs")

    def _precompute_reference(self, splits: tuple[str, ...] = ("train", "val")) -> None:
        """Attach reference log-probs to the pairs of the data module's ``splits`` that lack them
        (``reference_cache.py``)."""
        hp, trainer = self.hparams, self._trainer
        reference_cache.precompute(
            trainer, trainer.datamodule, self.reference_model, self.reference_path,
            [hp.dtype, hp.attn_implementation, str(trainer.precision)], hp.precompute_batch_size,
            hp.logits_chunk_size, hp.prefix_sharing, hp.ld_alpha, splits)

    def on_validation_start(self) -> None:
        if self._precomputes_reference:  # after a fit that ran without validation (configure_model skipped val)
            self._precompute_reference(("val",))

    def on_test_start(self) -> None:
        self.on_validation_start()  # the test loop runs on the validation pairs

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The frozen reference for one pass: the reference model when it is held; the policy with its adapters
        off (LoRA); otherwise the reference loaded for this pass only and released afterwards."""
        device = self._trainer.strategy.root_device
        if self.reference is not None:
            yield self.reference
        elif self.shares_reference:
            with lora.adapters_disabled(self.policy.to(device)):
                yield self.policy
        else:
            yield self._load(self.reference_path).eval().requires_grad_(False).to(device)

    def train(self, mode: bool = True) -> "DPOModule":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: Lightning's model.train() must not switch it back
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("reference.") and not self.hparams.sync_ref_model]:
            del state[key]  # rebuilt from its path; kept when TR-DPO has moved it
        if self.hparams.use_peft and self.policy is not None:  # the frozen base is rebuilt from its path
            trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
            for key in [k for k in state if k.startswith("policy.") and k not in trainable]:
                del state[key]

    # ---------------------------------------------------------------------------------------- the step
    def pair_logps(self, batch: PreferenceBatch) -> tuple[PairLogps, ResponseLogps]:
        """Policy and reference log-probs of a batch; also returns the policy's own reduction: logit sums, token
        statistics, the router load-balancing loss when it is on, LD-DPO's unweighted sums when ``ld_alpha`` is set."""
        inputs = (batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        chunk, ld_alpha = self.hparams.logits_chunk_size, self.hparams.ld_alpha
        response_logps_fn = shared_prefix_logps if self.share_prefix else response_logps
        # the reference runs first: its no-grad activations are gone before the policy's graph is built
        if reference_cache.REF_KEY in batch:  # precomputed: (2B,) chosen then rejected
            reference = batch[reference_cache.REF_KEY]
        elif not self.needs_reference:
            reference = None  # reference-free: log-prob 0
        elif self.reference is not None:
            with torch.no_grad():
                reference = response_logps_fn(self.reference, *inputs, chunk_size=chunk, ld_alpha=ld_alpha).logps
        elif self.shares_reference:
            with torch.no_grad(), lora.adapters_disabled(self.policy):
                reference = response_logps_fn(self.policy, *inputs, chunk_size=chunk, ld_alpha=ld_alpha).logps
        else:
            raise RuntimeError("a batch without reference log-probs, and no reference model: with "
                               "model.precompute_ref_log_probs every pair must come from the data module's train or "
                               "validation data")
        router = {"router_aux": True} if self.router_aux_coef else {}  # never with prefix sharing: configure_model
        policy = response_logps_fn(self.policy, *inputs, chunk_size=chunk, token_stats=True, ld_alpha=ld_alpha,
                                   **router)
        reference = torch.zeros_like(policy.logps) if reference is None else reference.to(policy.logps)
        unweighted = None if policy.unweighted_logps is None else policy.unweighted_logps.chunk(2)[0]
        x = PairLogps(*policy.logps.chunk(2), *reference.chunk(2), *policy.tokens.chunk(2), unweighted)
        return x, policy

    def _step(self, batch: PreferenceBatch, stage: str, batch_idx: int = 0) -> Tensor:
        x, policy = self.pair_logps(batch)
        tokens = torch.cat([x.chosen_tokens, x.rejected_tokens]).clamp(min=1).float()  # (2B,)
        weights = 1.0
        if self.hparams.use_weighting:  # WPO: exp of each response's mean aligned log-prob, chosen x rejected
            chosen_w, rejected_w = torch.exp(policy.stats.wpo_logps / tokens).chunk(2)
            weights = chosen_w * rejected_w
        terms = {name: (LOSSES[name](x, self.loss_params) * weights).mean() for name in self.loss_names}
        loss = sum(w * terms[n] for n, w in zip(self.loss_names, self.loss_weights))
        n_pairs = x.policy_chosen_logps.shape[0]
        values: dict[str, tuple[Tensor, Any]] = {}
        if policy.aux_loss is not None:  # mixture-of-experts router load balancing, as TRL adds it
            aux_loss = policy.aux_loss.to(loss)
            loss = loss + self.router_aux_coef * aux_loss
            values["aux_loss"] = (aux_loss.detach(), n_pairs)
        values["loss"] = (loss.detach(), n_pairs)
        if len(terms) > 1:
            values.update({f"loss/{n}": (t.detach(), n_pairs) for n, t in terms.items()})
        values.update({k: (v, 1.0) for k, v in preference_metrics(x, self.hparams.beta).items()})
        mean_logits = (policy.logit_sums / tokens).chunk(2)
        values["logits/chosen"] = (mean_logits[0], tokens[:n_pairs])
        values["logits/rejected"] = (mean_logits[1], tokens[n_pairs:])
        # token means over the batch: entropy over chosen and rejected tokens, top-1 accuracy over chosen ones
        all_tokens = (x.chosen_tokens.sum() + x.rejected_tokens.sum()).float()
        chosen_tokens = x.chosen_tokens.sum().float()
        values["entropy"] = (policy.stats.entropy.sum() / all_tokens.clamp(min=1), all_tokens)
        values["mean_token_accuracy"] = (policy.stats.top1[:n_pairs].sum() / chosen_tokens.clamp(min=1),
                                         chosen_tokens)
        for name, (value, weight) in values.items():
            metric = self.metrics[f"{stage}_metrics"][name.replace("/", "__")]
            if stage == "train":
                metric(value, weight)  # forward: this batch's value (synced across ranks) for the step log
                self.log(f"train/{name}", metric, on_step=True, on_epoch=False, prog_bar=name == "loss",
                         batch_size=n_pairs)
            else:
                metric.update(value, weight)
                self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "loss",
                         batch_size=n_pairs)
        return self._accumulation_weight(n_pairs, batch_idx) * loss if stage == "train" else loss

    def _accumulation_weight(self, n_pairs: int, batch_idx: int) -> float:
        """Weight of this micro-batch's mean loss so that an accumulation window's gradient is the mean over its
        pairs, also when the epoch's last window is short or its last batch is smaller (1.0 otherwise).
        Lightning divides every micro-batch loss by ``accumulate_grad_batches``; this undoes that per pair."""
        trainer = self._trainer
        loader = trainer.train_dataloader if trainer is not None else None
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        if accumulate == 1 or loader is None or not hasattr(loader, "sampler") or not loader.batch_size:
            return 1.0
        size, batch = len(loader.sampler), loader.batch_size
        n_batches = min(-(-size // batch), trainer.num_training_batches)
        start = (batch_idx // accumulate) * accumulate
        window = sum(min(batch, size - k * batch) for k in range(start, min(start + accumulate, n_batches)))
        return n_pairs * accumulate / window

    def _reset_metrics(self, stage: str) -> None:
        # States made under one grad mode (validate's inference mode) cannot be updated in place under
        # another (fit's no-grad validation), so each stage starts from fresh states made in its own mode.
        for metric in self.metrics[f"{stage}_metrics"].values():
            metric.reset()

    def on_train_epoch_start(self) -> None:
        self._reset_metrics("train")

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    # -------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except for an optimizer that would unscale fp16 gradients inside ``step`` (fused
        AdamW, the default) under mixed precision: Lightning refuses to clip those, under bf16 too, where nothing is
        scaled. Here a scaler (fp16) unscales them first, as Hugging Face Accelerate does (its ``step`` then skips
        its own unscaling and still skips steps whose gradients overflowed), and they are clipped as usual."""
        precision = self.trainer.precision_plugin
        if not gradient_clip_val or not isinstance(precision, MixedPrecision) or \
                not getattr(optimizer, "_step_supports_amp_scaling", False):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if precision.scaler is not None:
            precision.scaler.unscale_(optimizer)
        if gradient_clip_algorithm == "value":  # the plugin's own clipping, without its refusal
            precision.clip_grad_by_value(optimizer, gradient_clip_val)
        else:
            precision.clip_grad_by_norm(optimizer, gradient_clip_val)

    def on_train_start(self) -> None:
        # The schedule's length is set here, not in configure_optimizers: asking for estimated_stepping_batches
        # there builds the train loader before a checkpoint is restored, and a resumed run would then start
        # from the wrong batch.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, WarmupDecayLR) and scheduler.num_training_steps is None:
                scheduler.set_total_steps(max(1, int(self.trainer.estimated_stepping_batches)))
