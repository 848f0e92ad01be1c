"""The grouped settings of :class:`~dpo_lightning.training.module.DPOModule`: ``model.loss``, ``model.reference``,
``model.lora`` and ``model.compile`` in YAML and ``fit --help``. Each keeps TRL's option names and checks its values
when it is built, so a bad value stops the run before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Optional, Union

from ..losses import F_DIVERGENCE_LOSSES, LOSSES, PAIRWISE_LOSSES, REFERENCE_FREE_LOSSES, LossName, LossParams


@dataclass(frozen=True)
class LossSettings(LossParams):
    """What the policy is trained to minimise (``model.loss``).

    Args:
        loss_type: one loss name or a list of them (``losses.LOSSES``), e.g. ``[sigmoid, sft]`` for RPO.
        loss_weights: weight of each loss in ``loss_type``; all 1 when unset.
        beta: strength of the KL penalty towards the reference (DPO's beta; IPO's tau).
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
        router_aux_loss_coef: weight of a mixture-of-experts model's router load-balancing loss, added to the loss
            (TRL's option of the same name): the coefficient in the model config when unset (e.g. Mixtral's
            0.001), 0 to leave it out. A mixture-of-experts model with the loss on runs the plain layout, not
            prefix sharing, so the loss counts each row's tokens as TRL's does. An error for a model without a
            router.
    """

    loss_type: Union[LossName, list[LossName]] = "sigmoid"
    loss_weights: Optional[list[float]] = None
    ld_alpha: Optional[float] = None
    use_weighting: bool = False
    router_aux_loss_coef: Optional[float] = None

    @property
    def names(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        return [1.0] * len(self.names) if self.loss_weights is None else list(self.loss_weights)

    @property
    def needs_reference(self) -> bool:
        return not set(self.names) <= REFERENCE_FREE_LOSSES

    def __post_init__(self) -> None:
        names = self.names
        unknown = [n for n in names if n not in LOSSES]
        if unknown or not names:
            raise ValueError(f"model.loss.loss_type: unknown loss {unknown or '[]'}; choose from {sorted(LOSSES)}")
        if len(self.weights) != len(names):
            raise ValueError(f"model.loss.loss_weights has {len(self.weights)} entries but model.loss.loss_type has "
                             f"{len(names)}")
        if self.beta <= 0:
            raise ValueError(f"model.loss.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"model.loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in names and self.label_smoothing <= 0:
            raise ValueError("model.loss.loss_type exo_pair needs model.loss.label_smoothing > 0 (EXO's epsilon, the "
                             "weight of the dispreferred label; the paper uses 1e-3): at 0 the loss is infinite")
        unfit = sorted(set(names) - F_DIVERGENCE_LOSSES)
        if self.f_divergence_type != "reverse_kl" and unfit:
            raise ValueError(f"model.loss.f_divergence_type {self.f_divergence_type!r} works only with the losses "
                             f"{sorted(F_DIVERGENCE_LOSSES)}; {unfit} have no f-divergence form")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"model.loss.ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.use_weighting and set(names) - PAIRWISE_LOSSES:
            raise ValueError("model.loss.use_weighting (WPO) weights pairs, but aot and aot_unpaired compare sorted "
                             "batch statistics, which belong to no pair")
        if self.discopop_tau <= 0:
            raise ValueError(f"model.loss.discopop_tau must be positive, got {self.discopop_tau}")

    def params(self) -> LossParams:
        """The loss functions' parameters alone."""
        return LossParams(**{f.name: getattr(self, f.name) for f in fields(LossParams)})


@dataclass(frozen=True)
class ReferenceSettings:
    """Where the frozen reference's log-probs come from (``model.reference``; ``training/reference.py``).

    Args:
        model_name_or_path: the reference model; the policy's ``model_name_or_path`` when unset (with LoRA: the
            policy with its adapters switched off).
        reference_free: compare against a uniform reference (log-prob 0) and load no reference model.
        precompute_ref_log_probs: compute the reference log-probs of every train and validation pair once, before
            training (cached on disk under ``data.cache_dir``, reused across runs), and never load the reference
            for the steps: less memory, and no reference forward per step (TRL's option of the same name, which is
            off there by default). Without the PreferenceDataModule the reference is loaded as usual.
        precompute_batch_size: pairs per batch of that pass; the data's batch size when unset.
        sync_ref_model: TR-DPO: every ``ref_model_sync_steps`` optimizer steps move the reference towards the
            policy, ``ref <- alpha * policy + (1 - alpha) * ref`` with ``alpha = ref_model_mixup_alpha`` (TRL's
            options of the same names). The reference then changes, so its log-probs are not precomputed
            (``precompute_ref_log_probs`` is ignored) and checkpoints keep it. Not with LoRA or FSDP.
        ref_model_mixup_alpha: TR-DPO's alpha; 1 replaces the reference by the policy.
        ref_model_sync_steps: optimizer steps between reference updates.
    """

    model_name_or_path: Optional[str] = None
    reference_free: bool = False
    precompute_ref_log_probs: bool = True
    precompute_batch_size: Optional[int] = None
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self) -> None:
        if self.sync_ref_model and not (0.0 < self.ref_model_mixup_alpha <= 1.0 and self.ref_model_sync_steps >= 1):
            raise ValueError("model.reference.sync_ref_model needs model.reference.ref_model_mixup_alpha in (0, 1] "
                             f"and model.reference.ref_model_sync_steps >= 1, got {self.ref_model_mixup_alpha} and "
                             f"{self.ref_model_sync_steps}")
        if self.precompute_batch_size is not None and self.precompute_batch_size < 1:
            raise ValueError(f"model.reference.precompute_batch_size must be at least 1, got "
                             f"{self.precompute_batch_size}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters through ``peft`` (``model.lora``; needs ``pip install 'dpo_lightning[lora]'``).

    Args:
        use_peft: train LoRA adapters instead of every weight. The reference is then the policy with its adapters
            switched off: no second copy in memory (unless ``model.reference.model_name_or_path`` names another
            model). Checkpoints hold the adapters only.
        lora_r: LoRA rank.
        lora_alpha: LoRA scale numerator (the update is ``alpha / r * B @ A``).
        lora_dropout: dropout on the adapters' input.
        lora_target_modules: module names to adapt, e.g. ``[q_proj, v_proj]``; every linear layer except the
            output head when unset.
        lora_export: what the end-of-fit export writes: ``merged`` (plain ``transformers`` weights with the adapters
            folded in) or ``adapter`` (peft's ``adapter_model.safetensors`` + ``adapter_config.json``).
    """

    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: Optional[list[str]] = None
    lora_export: Literal["merged", "adapter"] = "merged"

    def __post_init__(self) -> None:
        if self.use_peft and self.lora_r <= 0:
            raise ValueError(f"model.lora.lora_r must be positive, got {self.lora_r}")


@dataclass(frozen=True)
class CompileSettings:
    """``torch.compile`` of each decoder layer of the policy and the reference (``model.compile``).

    Args:
        torch_compile: compile (dynamic shapes); the first steps are slow while it compiles.
        torch_compile_backend: compiler backend; ``inductor`` when unset.
        torch_compile_mode: e.g. ``max-autotune``; the backend's default when unset.
    """

    torch_compile: bool = False
    torch_compile_backend: Optional[str] = None
    torch_compile_mode: Optional[str] = None


SETTINGS = {"loss": LossSettings, "reference": ReferenceSettings, "lora": LoraSettings, "compile": CompileSettings}


def as_settings(name: str, value: Any) -> Any:
    """A section's settings object from itself, a dict (a checkpoint's hyper-parameters) or None (the defaults)."""
    cls = SETTINGS[name]
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)


def plain(value: Any) -> Any:
    """A settings object as a dict (checkpoints hold plain containers only, so they load with ``weights_only``)."""
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


