"""The metrics a step logs, under TRL's names: ``{stage}/rewards/*``, ``{stage}/logps/*``, ``{stage}/logits/*``,
``{stage}/entropy``, ``{stage}/mean_token_accuracy``, the loss and its terms, as token- or pair-weighted means."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from ..losses import PairLogps, preference_metrics
from ..model.logprobs import ResponseLogps

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
           "aux_loss")
STAGES = ("train", "val", "test")
Weighted = dict[str, tuple[Tensor, Any]]  # metric name -> (value(s), weight(s)) of a weighted mean


def step_metrics(x: PairLogps, policy: ResponseLogps, loss: Tensor, terms: dict[str, Tensor], beta: float,
                 aux_loss: Tensor | None = None) -> Weighted:
    """What one batch contributes to each metric: per-pair values (weight 1), per-batch means with their pair or
    token counts as weights."""
    n_pairs = x.policy_chosen_logps.shape[0]
    values: Weighted = {}
    if aux_loss is not None:  # mixture-of-experts router load balancing
        values["aux_loss"] = (aux_loss.detach(), n_pairs)
    values["loss"] = (loss.detach(), n_pairs)
    if len(terms) > 1:
        values.update({f"loss/{n}": (t.detach(), n_pairs) for n, t in terms.items()})
    values.update({k: (v, 1.0) for k, v in preference_metrics(x, beta).items()})
    tokens = torch.cat([x.chosen_tokens, x.rejected_tokens]).clamp(min=1).float()  # (2B,)
    mean_logits = (policy.logit_sums / tokens).chunk(2)
    values["logits/chosen"] = (mean_logits[0], tokens[:n_pairs])
    values["logits/rejected"] = (mean_logits[1], tokens[n_pairs:])
    # token means over the batch: entropy over chosen and rejected tokens, top-1 accuracy over chosen ones
    all_tokens = (x.chosen_tokens.sum() + x.rejected_tokens.sum()).float()
    chosen_tokens = x.chosen_tokens.sum().float()
    values["entropy"] = (policy.stats.entropy.sum() / all_tokens.clamp(min=1), all_tokens)
    values["mean_token_accuracy"] = (policy.stats.top1[:n_pairs].sum() / chosen_tokens.clamp(min=1), chosen_tokens)
    return values


class PreferenceMetrics(nn.Module):
    """One weighted mean per metric and stage. Training logs each step's value (synced across ranks); validation
    and test log the epoch's mean.

    Args:
        loss_names: the losses in use; with more than one, each term is logged as ``loss/<name>`` too.
    """

    def __init__(self, loss_names: Sequence[str]) -> None:
        super().__init__()
        names = METRICS + tuple(f"loss/{n}" for n in loss_names if len(loss_names) > 1)
        self.stages = nn.ModuleDict({  # keyed "train_metrics": "train" would shadow nn.Module.train
            f"{stage}_metrics": nn.ModuleDict({n.replace("/", "__"): MeanMetric(dist_sync_on_step=stage == "train")
                                  for n in names})
            for stage in STAGES})

    def _apply(self, fn: Any, recurse: bool = True) -> "PreferenceMetrics":
        # ``Module.to(dtype)``, which Lightning's bf16-true and 16-true precisions apply to the whole module, turns
        # torchmetrics' states into that dtype too: a mean accumulated in bf16 keeps about 3 significant digits.
        # Half-precision states go back to float32.
        super()._apply(fn, recurse)
        for metric in self.modules():
            if isinstance(metric, Metric) and metric.dtype in (torch.float16, torch.bfloat16):
                metric.set_dtype(torch.float32)
        return self

    def reset(self, stage: str) -> None:
        # States made under one grad mode (validate's inference mode) cannot be updated in place under
        # another (fit's no-grad validation), so each stage starts from fresh states made in its own mode.
        for metric in self.stages[f"{stage}_metrics"].values():
            metric.reset()

    def log(self, module: LightningModule, stage: str, values: Weighted, n_pairs: int) -> None:
        for name, (value, weight) in values.items():
            metric = self.stages[f"{stage}_metrics"][name.replace("/", "__")]
            if stage == "train":
                metric(value, weight)  # forward: this batch's value (synced across ranks) for the step log
                module.log(f"train/{name}", metric, on_step=True, on_epoch=False, prog_bar=name == "loss",
                           batch_size=n_pairs)
            else:
                metric.update(value, weight)
                module.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "loss",
                           batch_size=n_pairs)
