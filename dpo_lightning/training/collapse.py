"""``CollapseGuard``: stop a run whose answers are collapsing, and warn on DPO's likelihood-collapse signature."""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

GOOD_CHECKPOINT = "last_good.ckpt"


class TrainingCollapsed(RuntimeError):
    """Raised by :class:`CollapseGuard`; the command line prints its message without a traceback."""


class CollapseGuard(Callback):
    """Stop training when the generation probes show the answers collapsing; warn when the training log-probs show
    DPO's collapse signature.

    **With probes** (``probes.prompts_path`` set and a validation that runs: ``val_check_interval`` sets how often),
    after each validation the probes' figures are checked against the bounds: the degenerate rate
    (``val/probes/degenerate_rate``) and the drift (``val/probes/drift``; both the worst over the probes' system
    prompts). Each validation that passes writes ``last_good.ckpt`` beside the run's checkpoints; when a figure is
    above its bound, training stops with an error that names it, and ``last_good.ckpt`` holds the last validation
    that passed (``python -m dpo_lightning export --ckpt_path ...`` turns it into a model).

    **From the training log-probs** (with or without probes), a warning when the chosen responses become much less
    likely than under the reference while the margins grow: both log-probs falling together, the failure in which
    DPO widens the gap between two similar answers by pushing both down, until greedy answers repeat the word that
    differs ("Deep deep Deep…"). Checked on the mean over the last ``window`` training batches: policy chosen
    log-prob below ``(1 + max_chosen_logp_fall)`` times the reference's, with a positive margin. Once per run.

    Args:
        max_degenerate_rate: stop when the probes' degenerate rate exceeds this (a share, 0-1); null = no bound.
            Set it above the base model's own rate, which ``compare`` prints: small instruct models ramble
            (SmolLM2-135M-Instruct: half its answers to identity questions run on or repeat).
        max_drift: stop when the probes' drift (general-prompt NLL, trained / base) exceeds this; null = no bound.
            The default, 1.5, stops a run whose general answers have become far less likely than the base's.
        max_chosen_logp_fall: warn when the chosen log-prob is more than this share below the reference's (0.5:
            the policy's summed log-prob of the chosen answers is 1.5 times the reference's); null = no warning.
        window: training batches the warning averages over.
        enabled: set to false to switch the guard off.
    """

    def __init__(self, max_degenerate_rate: Optional[float] = None, max_drift: Optional[float] = 1.5,
                 max_chosen_logp_fall: Optional[float] = 0.5, window: int = 16, enabled: bool = True) -> None:
        self.max_degenerate_rate, self.max_drift = max_degenerate_rate, max_drift
        self.max_chosen_logp_fall, self.window, self.enabled = max_chosen_logp_fall, window, enabled
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=window)  # (policy, reference, margin) logps
        self.warned = False
        self.stopped: Optional[str] = None  # the reason, once the guard has stopped a run
        self.good_step: Optional[int] = None  # global step of the last validation whose probes passed

    # ----------------------------------------------------------------------------------------- probes: stop
    def reason(self, metrics: dict[str, Any]) -> Optional[str]:
        """Why the probe figures in ``metrics`` cross a bound, or None."""
        checks = (("degenerate rate", "val/probes/degenerate_rate", self.max_degenerate_rate),
                  ("drift", "val/probes/drift", self.max_drift))
        for label, key, bound in checks:
            value = metrics.get(key)
            if bound is not None and value is not None and float(value) > bound:
                return f"{label} {float(value):.4f} above its bound {bound} ({key})"
        return None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # `validate` only reports
        # the probes run and log on global rank 0 only: its verdict holds for every rank
        verdict = self.reason(trainer.callback_metrics) if trainer.is_global_zero else None
        probed = any(k.startswith("val/probes/") for k in trainer.callback_metrics)
        reason, probed = trainer.strategy.broadcast((verdict, probed), src=0)
        if not probed:
            return
        path = self.good_checkpoint_path(trainer)
        if reason is None:
            trainer.save_checkpoint(path)  # every rank: a collective under sharded strategies
            self.good_step = trainer.global_step
            return
        self.stopped = reason
        kept = (f"The checkpoint of global step {self.good_step}, the last whose probes passed: {path} "
                f"(`python -m dpo_lightning export --ckpt_path {path} --output_dir DIR` makes a model of it)."
                if self.good_step is not None else "No validation had passed yet: no checkpoint was kept.")
        raise TrainingCollapsed(
            f"[dpo_lightning] collapse guard: at global step {trainer.global_step} the probes' {reason}; training "
            f"stopped. {kept} Lower the learning rate or the number of steps, add an NLL term on chosen "
            "(loss_type [sigmoid, sft]) or anchor pairs; the answers are in TensorBoard (val/probes/answers). "
            "Bounds: --collapse_guard.max_degenerate_rate, --collapse_guard.max_drift.")

    @staticmethod
    def good_checkpoint_path(trainer: Trainer) -> str:
        """``last_good.ckpt`` beside the run's other checkpoints."""
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints")
        return os.path.join(dirpath, GOOD_CHECKPOINT)

    # ------------------------------------------------------------------------------- log-probs: warning
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled or self.max_chosen_logp_fall is None or self.warned:
            return
        metrics = trainer.callback_metrics
        beta = getattr(getattr(pl_module, "loss_settings", None), "beta", None)
        if beta is None or not {"train/logps/chosen", "train/rewards/chosen", "train/rewards/margins"} <= set(metrics):
            return
        policy = float(metrics["train/logps/chosen"])
        reference = policy - float(metrics["train/rewards/chosen"]) / beta  # rewards/chosen = beta (policy - ref)
        self.recent.append((policy, reference, float(metrics["train/rewards/margins"])))
        if len(self.recent) < self.window:
            return
        policy, reference, margin = (sum(v) / len(self.recent) for v in zip(*self.recent))
        if reference < 0 and policy < (1 + self.max_chosen_logp_fall) * reference and margin > 0:
            self.warned = True
            rank_zero_warn(
                f"[dpo_lightning] collapse guard: at global step {trainer.global_step} the chosen answers' log-prob "
                f"is {policy:.1f} against the reference's {reference:.1f} (mean of the last {self.window} batches) "
                f"while the margin is {margin:.2f}: both answers are being pushed down, DPO's collapse signature "
                "(greedy answers may start repeating the words that differ). Add an NLL term on chosen (loss_type "
                "[sigmoid, sft]), lower the learning rate, or set probes.prompts_path so the guard can stop the run "
                "on what the model generates.")

