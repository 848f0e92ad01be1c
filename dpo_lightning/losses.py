"""Pure preference-loss math. Shapes: ``B`` pairs, ``T`` tokens, ``V`` vocabulary.

Every loss takes a :class:`PairLogps` (summed response log-probs of policy and reference, and response lengths)
and a :class:`LossParams`, and returns one value per pair, ``(B,)``. The trainer takes the mean over pairs and
adds the weighted losses. ``chosen``/``rejected`` rewards are ``beta * (policy - reference)`` log-ratios, as in
Rafailov et al. 2023, Eq. 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

LossName = Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "sft", "dpop", "apo_zero",
                   "apo_down", "bco_pair", "exo_pair", "nca_pair", "sppo_hard", "aot", "aot_unpaired", "discopop"]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


class PairLogps(NamedTuple):
    policy_chosen_logps: Tensor  # (B,) summed log-probs of the chosen response under the policy
    policy_rejected_logps: Tensor  # (B,)
    reference_chosen_logps: Tensor  # (B,) zeros when training reference-free
    reference_rejected_logps: Tensor  # (B,)
    chosen_tokens: Tensor  # (B,) response lengths in tokens
    rejected_tokens: Tensor  # (B,)
    policy_chosen_unweighted: Optional[Tensor] = None  # (B,) plain sums when the log-probs carry LD-DPO's weights


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1  # KL strength (DPO's beta, IPO's tau)
    label_smoothing: float = 0.0  # assumed share of flipped labels (cDPO, robust DPO)
    simpo_gamma: float = 0.5  # SimPO target reward margin gamma (absolute, as TRL's CPOConfig.simpo_gamma)
    dpop_lambda: float = 50.0  # DPOP penalty weight
    discopop_tau: float = 0.05  # DiscoPOP's temperature of the logistic/exponential mix
    f_divergence_type: FDivergence = "reverse_kl"  # f-DPO regulariser: reverse_kl (DPO), forward_kl, ...
    f_alpha_divergence_coef: float = 0.5  # alpha of the alpha-divergence


def upcast(t: Tensor) -> Tensor:
    """fp32 for bf16/fp16 tensors; wider dtypes stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Summed log-probs of the masked tokens, from full logits (the plain reference path).

    Args:
        logits: (2B, T, V) model outputs; position t predicts token t + 1.
        input_ids: (2B, T) token ids.
        loss_mask: (2B, T) 1 on response tokens.
    Returns:
        (2B,) sum over response tokens of log p(token | tokens before it).
    """
    logps = torch.log_softmax(upcast(logits[:, :-1]), dim=-1)  # (2B, T-1, V)
    token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (2B, T-1)
    return (token_logps * loss_mask[:, 1:]).sum(-1)


def _logratios(x: PairLogps) -> tuple[Tensor, Tensor]:
    return x.policy_chosen_logps - x.reference_chosen_logps, x.policy_rejected_logps - x.reference_rejected_logps


def _scores(x: PairLogps, p: LossParams) -> tuple[Tensor, Tensor]:
    """f'(pi/ref) of each response under the f-divergence regulariser of f-DPO (Wang et al. 2023, "Beyond Reverse
    KL"): the log-ratio u itself for the reverse KL (DPO); ``1 - e^-u`` forward KL; ``log 2 + log s(u)``
    Jensen-Shannon; ``(e^((a-1)u) - 1) / (a-1)`` alpha-divergence. Each (B,)."""
    chosen, rejected = _logratios(x)
    kind, a = p.f_divergence_type, p.f_alpha_divergence_coef
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(a - 1.0) < 1e-6):  # the alpha -> 1 limit
        return chosen, rejected
    if kind == "forward_kl":
        return 1 - torch.exp(-chosen), 1 - torch.exp(-rejected)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen), math.log(2) + F.logsigmoid(rejected)
    if kind == "alpha_divergence":  # exponent capped at 80 so that exp stays finite in fp32 (as TRL)
        return tuple(torch.expm1(torch.clamp((a - 1) * u, max=80.0)) / (a - 1) for u in (chosen, rejected))
    raise ValueError(f"unknown f-divergence {kind!r}; choose from {list(get_args(FDivergence))}")


def _delta(x: PairLogps, p: LossParams) -> Tensor:
    """(B,) chosen score minus rejected score: DPO's log-ratio margin under the reverse KL, summed in the order of
    Rafailov et al.'s Eq. 7 (policy margin minus reference margin), as ``dpo_loss`` and TRL sum it. Another order
    changes only rounding, but a training run follows its rounding."""
    if p.f_divergence_type == "reverse_kl":
        return (x.policy_chosen_logps - x.policy_rejected_logps) - (x.reference_chosen_logps
                                                                    - x.reference_rejected_logps)
    chosen, rejected = _scores(x, p)
    return chosen - rejected


def _smoothed_sigmoid(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1-e) log s(z) - e log s(-z), per pair: Rafailov et al. 2023, Eq. 7, with cDPO's (Mitchell 2023) share e
    of flipped labels."""
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps: Tensor,
             reference_rejected_logps: Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> Tensor:
    """Sigmoid DPO loss per pair; all inputs (B,), returns (B,). ``label_smoothing`` > 0 gives cDPO."""
    logits = (policy_chosen_logps - policy_rejected_logps) - (reference_chosen_logps - reference_rejected_logps)
    return _smoothed_sigmoid(beta * logits, label_smoothing)


def sigmoid(x: PairLogps, p: LossParams) -> Tensor:
    """DPO (Eq. 7), cDPO with ``label_smoothing``; f-DPO with another f-divergence."""
    return _smoothed_sigmoid(p.beta * _delta(x, p), p.label_smoothing)


def ipo(x: PairLogps, p: LossParams) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17) on per-token log-ratios, as TRL and the IPO authors use it."""
    chosen, rejected = _scores(x, p)
    h = chosen / x.chosen_tokens.clamp(min=1) - rejected / x.rejected_tokens.clamp(min=1)
    return (h - 1 / (2 * p.beta)) ** 2


def hinge(x: PairLogps, p: LossParams) -> Tensor:
    """SLiC-HF hinge (Zhao et al. 2023, Eq. 3 with the reference log-ratio): max(0, 1 - beta * margin)."""
    return torch.relu(1 - p.beta * _delta(x, p))


def robust(x: PairLogps, p: LossParams) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, Eq. 8): unbiased under a ``label_smoothing`` share of flipped labels."""
    z = p.beta * _delta(x, p)
    eps = p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def sigmoid_norm(x: PairLogps, p: LossParams) -> Tensor:
    """Length-normalised DPO: sigmoid loss on per-token log-ratios (TRL's ``sigmoid_norm``)."""
    chosen, rejected = _scores(x, p)
    delta = chosen / x.chosen_tokens.clamp(min=1) - rejected / x.rejected_tokens.clamp(min=1)
    return -F.logsigmoid(p.beta * delta)


def exo_pair(x: PairLogps, p: LossParams) -> Tensor:
    """EXO-pref (Ji et al. 2024, Eq. 16): KL from the policy's preference ``softmax(beta * scores)`` over the pair
    to the smoothed label ``[1 - e, e]``, e = ``label_smoothing`` (> 0; the paper uses 1e-3)."""
    z, eps = p.beta * _delta(x, p), p.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair(x: PairLogps, p: LossParams) -> Tensor:
    """NCA (Chen et al. 2024, noise contrastive alignment, two responses):
    ``-log s(r_c) - (log s(-r_c) + log s(-r_r)) / 2`` with rewards ``r = beta * log-ratio``."""
    chosen, rejected = _logratios(x)
    return (-F.logsigmoid(p.beta * chosen) - 0.5 * F.logsigmoid(-p.beta * chosen)
            - 0.5 * F.logsigmoid(-p.beta * rejected))


def sppo_hard(x: PairLogps, p: LossParams) -> Tensor:
    """SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities 1 and 0: log-ratios pulled to +-1/(2 beta)."""
    chosen, rejected = _logratios(x)
    return (chosen - 0.5 / p.beta) ** 2 + (rejected + 0.5 / p.beta) ** 2


def aot(x: PairLogps, p: LossParams) -> Tensor:
    """AOT (Melnyk et al. 2024), paired: the batch's sorted policy log-ratio margins against the sorted reference
    margins, through the (label-smoothed) sigmoid loss. Depends on the whole batch (B,) -> (B,)."""
    policy = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps, dim=0).values
    reference = torch.sort(x.reference_chosen_logps - x.reference_rejected_logps, dim=0).values
    return _smoothed_sigmoid(p.beta * (policy - reference), p.label_smoothing)


def aot_unpaired(x: PairLogps, p: LossParams) -> Tensor:
    """AOT, unpaired: the batch's sorted chosen log-ratios against its sorted rejected ones (B,) -> (B,)."""
    chosen, rejected = _logratios(x)
    delta = torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


def discopop(x: PairLogps, p: LossParams) -> Tensor:
    """DiscoPOP (Lu et al. 2024, Eq. 5): logistic and exponential losses mixed by s(z / tau), z = beta *
    margin, tau = ``discopop_tau``."""
    z = p.beta * _delta(x, p)
    mix = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def simpo(x: PairLogps, p: LossParams) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-normalised, with a target margin.

    ``-log sigmoid(beta * (avg_logp_chosen - avg_logp_rejected) - gamma)`` with ``gamma = simpo_gamma``.
    """
    delta = (x.policy_chosen_logps / x.chosen_tokens.clamp(min=1)
             - x.policy_rejected_logps / x.rejected_tokens.clamp(min=1))
    return -F.logsigmoid(p.beta * delta - p.simpo_gamma)


def sft(x: PairLogps, p: LossParams) -> Tensor:
    """NLL of the chosen responses per token (RPO, Pang et al. 2024, Eq. 3; TRL's ``sft``).

    The mean is over all chosen tokens of the batch (a token-weighted mean, as TRL), returned for every pair.
    """
    logps = x.policy_chosen_logps if x.policy_chosen_unweighted is None else x.policy_chosen_unweighted
    nll = -logps.sum() / x.chosen_tokens.sum().clamp(min=1)
    return nll.expand_as(x.policy_chosen_logps)


def dpop(x: PairLogps, p: LossParams) -> Tensor:
    """DPO-Positive (Pal et al. 2024, Eq. 3): penalise the chosen log-prob falling below the reference's."""
    chosen, rejected = _logratios(x)
    penalty = torch.clamp(x.reference_chosen_logps - x.policy_chosen_logps, min=0)
    return -F.logsigmoid(p.beta * (chosen - rejected - p.dpop_lambda * penalty))


def apo_zero(x: PairLogps, p: LossParams) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise chosen, lower rejected, each against the reference."""
    chosen, rejected = _logratios(x)
    return (1 - torch.sigmoid(p.beta * chosen)) + torch.sigmoid(p.beta * rejected)


def apo_down(x: PairLogps, p: LossParams) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8): lower chosen, and lower rejected more."""
    chosen, rejected = _logratios(x)
    return torch.sigmoid(p.beta * chosen) + (1 - torch.sigmoid(p.beta * (chosen - rejected)))


def bco_pair(x: PairLogps, p: LossParams) -> Tensor:
    """Paired binary classifier optimisation (Jung et al. 2024), without the running reward shift, as TRL."""
    chosen, rejected = _logratios(x)
    return -F.logsigmoid(p.beta * chosen) - F.logsigmoid(-p.beta * rejected)


LOSSES: dict[str, Callable[[PairLogps, LossParams], Tensor]] = {
    "sigmoid": sigmoid, "ipo": ipo, "hinge": hinge, "robust": robust, "sigmoid_norm": sigmoid_norm,
    "simpo": simpo, "sft": sft, "dpop": dpop, "apo_zero": apo_zero, "apo_down": apo_down, "bco_pair": bco_pair,
    "exo_pair": exo_pair, "nca_pair": nca_pair, "sppo_hard": sppo_hard, "aot": aot, "aot_unpaired": aot_unpaired,
    "discopop": discopop,
}  # keyed by every LossName, in its order (tests/test_losses.py)
REFERENCE_FREE_LOSSES = frozenset({"simpo", "sft"})  # losses that never read the reference log-probs
# losses built on the chosen-minus-rejected score, where f-DPO's log Z(x) term cancels (and sft, which ignores it)
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
PAIRWISE_LOSSES = frozenset(get_args(LossName)) - {"aot", "aot_unpaired"}  # one value per pair, not per sorted slot


def wpo_weights(wpo_logps: Tensor, tokens: Tensor) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, Eq. 2): the exp of each response's mean aligned log-prob, chosen
    times rejected. ``wpo_logps`` (2B,) summed aligned log-probs, ``tokens`` (2B,) response lengths; returns (B,)."""
    chosen, rejected = torch.exp(wpo_logps / tokens).chunk(2)
    return chosen * rejected


def combine_losses(x: PairLogps, names: Sequence[str], weights: Sequence[float], params: LossParams,
                   pair_weights: Tensor | float = 1.0, aux_loss: Optional[Tensor] = None,
                   aux_coef: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The training objective: ``sum_k w_k * mean_pairs(pair_weights * loss_k)`` (RPO and other mixes), plus
    ``aux_coef`` times a mixture-of-experts router's load-balancing loss when given (as TRL adds it).

    Args:
        x: the batch's log-probs, each (B,).
        names, weights: the losses (``LOSSES`` keys) and their weights.
        pair_weights: (B,) WPO's weights (``wpo_weights``), or 1.
        aux_loss: () the router's load-balancing loss.
    Returns:
        the loss () and each term's pair mean () by name.
    """
    terms = {name: (LOSSES[name](x, params) * pair_weights).mean() for name in names}
    loss = sum(w * terms[n] for n, w in zip(names, weights))
    if aux_loss is not None:
        loss = loss + aux_coef * aux_loss.to(loss)
    return loss, terms


def preference_metrics(x: PairLogps, beta: float) -> dict[str, Tensor]:
    """Per-pair metrics under TRL's names; each value is (B,).

    ``rewards/accuracies`` counts a pair as correct only when the chosen reward is strictly larger.
    """
    chosen, rejected = _logratios(x)
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": x.policy_chosen_logps.detach(),
        "logps/rejected": x.policy_rejected_logps.detach(),
    }
