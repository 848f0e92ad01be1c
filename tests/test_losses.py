"""Each loss against hand-worked numbers (in the docstrings) or an independent formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_lightning.losses import LOSSES, LossParams, PairLogps, dpo_loss, preference_metrics, sequence_logps


def pair(pc, pr, rc, rr, lc=1.0, lr=1.0):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(pc), t(pr), t(rc), t(rr), t(lc), t(lr))


def log_sigmoid(z):
    return -math.log1p(math.exp(-z))


def test_dpo_loss_by_hand():
    """policy chosen -10, rejected -12; reference -11, -11. Log-ratio margin = (-10+12) - 0 = 2.
    beta 0.1 -> loss = -log sigmoid(0.2) = 0.598139."""
    loss = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), 0.1)
    assert loss.item() == pytest.approx(0.5981389, abs=1e-6)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    x = torch.tensor([-3.0, -7.5])
    assert torch.allclose(dpo_loss(x, x + 1, x, x + 1, beta=0.3), torch.full((2,), math.log(2)))


def test_cdpo_label_smoothing_by_hand():
    """margin 2, beta 0.5 -> z = 1; eps 0.1: 0.9 * -log s(1) + 0.1 * -log s(-1) = 0.9*0.313262 + 0.1*1.313262."""
    loss = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]),
                    beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)


def test_the_tutorials_formula():
    """The tutorial's L = -log s(beta * (log pi(y+)/ref(y+) - log pi(y-)/ref(y-))) written out with probabilities."""
    pi_pos, pi_neg, ref_pos, ref_neg, beta = 0.02, 0.001, 0.01, 0.004, 0.2
    expected = -math.log(1 / (1 + math.exp(-beta * (math.log(pi_pos / ref_pos) - math.log(pi_neg / ref_neg)))))
    got = dpo_loss(*(torch.tensor([math.log(v)], dtype=torch.float64) for v in (pi_pos, pi_neg, ref_pos, ref_neg)),
                   beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_sequence_logps_against_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    ids = torch.randint(0, 11, (4, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
    expected = torch.zeros(4)
    for b in range(4):
        for t in range(1, 6):
            if mask[b, t]:
                expected[b] += torch.log(torch.softmax(logits[b, t - 1], -1)[ids[b, t]])
    assert torch.allclose(sequence_logps(logits, ids, mask), expected, atol=1e-5)


def test_preference_metrics_by_hand():
    """beta 0.5; chosen log-ratios 1 and -2, rejected -1 and -1 -> rewards 0.5, -1 / -0.5, -0.5."""
    x = PairLogps(torch.tensor([-9.0, -12.0]), torch.tensor([-12.0, -13.0]), torch.tensor([-10.0, -10.0]),
                  torch.tensor([-11.0, -12.0]), torch.tensor([3.0, 4.0]), torch.tensor([2.0, 2.0]))
    m = preference_metrics(x, beta=0.5)
    assert m["rewards/chosen"].tolist() == [0.5, -1.0]
    assert m["rewards/rejected"].tolist() == [-0.5, -0.5]
    assert m["rewards/margins"].tolist() == [1.0, -0.5]
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert m["logps/chosen"].tolist() == [-9.0, -12.0]


# Hand-worked cases for the whole family. Shared inputs: policy chosen -10, rejected -12, reference chosen -11,
# rejected -11, lengths 4 and 2, beta 0.5 -> chosen log-ratio +1, rejected log-ratio -1, margin 2.
X = pair(-10, -12, -11, -11, 4, 2)
P = LossParams(beta=0.5, label_smoothing=0.1, simpo_gamma=0.5, dpop_lambda=2.0)
HAND = {
    # -(0.9) log s(1) - 0.1 log s(-1)
    "sigmoid": 0.9 * -log_sigmoid(1) + 0.1 * -log_sigmoid(-1),
    # per-token ratios 1/4 and -1/2 -> h = 0.75; (0.75 - 1/(2*0.5))^2 = 0.0625
    "ipo": 0.0625,
    # relu(1 - 0.5*2) = 0
    "hinge": 0.0,
    # (-(0.9) log s(1) + 0.1 log s(-1)) / 0.8
    "robust": (0.9 * -log_sigmoid(1) + 0.1 * log_sigmoid(-1)) / 0.8,
    # -log s(0.5 * 0.75)
    "sigmoid_norm": -log_sigmoid(0.375),
    # avg logps -2.5 and -6 -> -log s(0.5 * 3.5 - gamma 0.5)
    "simpo": -log_sigmoid(1.25),
    # NLL per chosen token: 10 / 4
    "sft": 2.5,
    # chosen above reference -> no penalty: -log s(0.5 * 2)
    "dpop": -log_sigmoid(1.0),
    # (1 - s(0.5)) + s(-0.5)
    "apo_zero": 2 * (1 - 1 / (1 + math.exp(-0.5))),
    # s(0.5) + 1 - s(0.5 * 2)
    "apo_down": 1 / (1 + math.exp(-0.5)) + 1 - 1 / (1 + math.exp(-1.0)),
    # -log s(0.5) - log s(0.5)
    "bco_pair": -2 * log_sigmoid(0.5),
    # z = 0.5 * 2 = 1, eps 0.1: KL([s(1), s(-1)] || [0.9, 0.1])
    "exo_pair": (1 / (1 + math.exp(-1))) * (log_sigmoid(1) - math.log(0.9))
    + (1 / (1 + math.exp(1))) * (log_sigmoid(-1) - math.log(0.1)),
    # rewards 0.5 and -0.5: -log s(0.5) - 0.5 log s(-0.5) - 0.5 log s(0.5)
    "nca_pair": -1.5 * log_sigmoid(0.5) - 0.5 * log_sigmoid(-0.5),
    # ratios +1 and -1 sit exactly on +-1/(2 * 0.5)
    "sppo_hard": 0.0,
    # one pair: sorted margins are the margins, 2 - 0: the smoothed sigmoid of 0.5 * 2
    "aot": 0.9 * -log_sigmoid(1) + 0.1 * -log_sigmoid(-1),
    # one pair: sorted chosen ratio 1 minus sorted rejected ratio -1
    "aot_unpaired": 0.9 * -log_sigmoid(1) + 0.1 * -log_sigmoid(-1),
    # z = 1, tau 0.05: mix s(20) of the exponential e^-1 and the logistic -log s(1)
    "discopop": -log_sigmoid(1) * (1 - 1 / (1 + math.exp(-20))) + math.exp(-1) / (1 + math.exp(-20)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_by_hand(name):
    assert name in HAND, f"add a hand-worked value for {name}"
    assert LOSSES[name](X, P).item() == pytest.approx(HAND[name], abs=1e-9)


def test_dpop_penalty_by_hand():
    """Chosen falls 1 below the reference: policy chosen -12, rejected -14,
    reference -11, -11 -> chosen ratio -1, rejected -3, margin 2; penalty lambda 2 * 1 -> -log s(0.5 * 0)."""
    x = pair(-12, -14, -11, -11)
    assert LOSSES["dpop"](x, P).item() == pytest.approx(math.log(2), abs=1e-12)


def test_hinge_active_by_hand():
    """margin 1, beta 0.5 -> relu(1 - 0.5) = 0.5."""
    assert LOSSES["hinge"](pair(-10, -11, -10, -10), P).item() == pytest.approx(0.5)


def test_sft_is_token_weighted_over_the_batch():
    x = PairLogps(torch.tensor([-4.0, -20.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                  torch.tensor([2.0, 8.0]), torch.ones(2))
    assert LOSSES["sft"](x, P).tolist() == pytest.approx([2.4, 2.4])  # 24 nats over 10 tokens


def test_losses_have_gradients_where_expected():
    pc = torch.tensor([-10.0], requires_grad=True)
    x = PairLogps(pc, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]),
                  torch.tensor([4.0]), torch.tensor([2.0]))
    for name, fn in LOSSES.items():
        pc.grad = None
        fn(x, LossParams(label_smoothing=0.1)).sum().backward()
        if name != "hinge":  # hinge is flat past its margin
            assert pc.grad is not None and pc.grad.item() != 0, name


def test_sppo_hard_off_target_by_hand():
    """chosen ratio 0, rejected -1, beta 0.5: (0 - 1)^2 + (-1 + 1)^2 = 1."""
    assert LOSSES["sppo_hard"](pair(-10, -11, -10, -10), P).item() == pytest.approx(1.0)


def test_aot_sorts_across_the_batch_by_hand():
    """Policy margins [3, -1], reference margins [0, 2]: sorted [-1, 3] against [0, 2] -> deltas [-1, 1], whatever
    pair they came from; unpaired: chosen ratios [1, -2] and rejected [0, 1] sort to [-2, 1] and [0, 1]."""
    x = PairLogps(torch.tensor([0.0, -3.0]), torch.tensor([-3.0, -2.0]), torch.tensor([0.0, -2.0]),
                  torch.tensor([0.0, -4.0]), torch.ones(2), torch.ones(2))
    p = LossParams(beta=1.0)
    assert LOSSES["aot"](x, p).tolist() == pytest.approx([-log_sigmoid(-1), -log_sigmoid(1)])
    unpaired = PairLogps(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0]), torch.zeros(2), torch.zeros(2),
                         torch.ones(2), torch.ones(2))
    assert LOSSES["aot_unpaired"](unpaired, p).tolist() == pytest.approx([-log_sigmoid(-2), -log_sigmoid(0)])


@pytest.mark.parametrize("kind, alpha, delta", [
    ("forward_kl", 0.5, 2 * math.sinh(1)),  # (1 - e^-1) - (1 - e)
    ("js_divergence", 0.5, 1.0),  # log s(1) - log s(-1) = 1
    ("alpha_divergence", 0.5, 4 * math.sinh(0.5)),  # ((e^-0.5 - 1) - (e^0.5 - 1)) / -0.5
    ("alpha_divergence", 1.0, 2.0),  # the alpha -> 1 limit is the reverse KL: the plain margin
])
def test_f_divergence_scores_by_hand(kind, alpha, delta):
    """X's log-ratios are +1 and -1; each f-divergence turns them into scores whose difference is ``delta``."""
    p = LossParams(beta=0.5, f_divergence_type=kind, f_alpha_divergence_coef=alpha)
    assert LOSSES["sigmoid"](X, p).item() == pytest.approx(-log_sigmoid(0.5 * delta), abs=1e-9)
    assert LOSSES["hinge"](X, p).item() == pytest.approx(max(0.0, 1 - 0.5 * delta), abs=1e-9)


def test_sigmoid_matches_torch_formula_on_random_inputs():
    torch.manual_seed(0)
    a, b, c, d = (torch.randn(16) * 5 for _ in range(4))
    expected = -F.logsigmoid(0.2 * ((a - b) - (c - d)))
    assert torch.allclose(dpo_loss(a, b, c, d, beta=0.2), expected)


def test_simpo_matches_trl_cpo_loss():
    """TRL implements SimPO in its CPO trainer, on length-averaged log-probs; same gamma convention."""
    from types import SimpleNamespace

    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(8) * 40, -torch.rand(8) * 40
    chosen_len, rejected_len = torch.randint(1, 30, (8,)).float(), torch.randint(1, 30, (8,)).float()
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device="cpu"))
    expected = cpo.CPOTrainer.cpo_loss(fake, chosen / chosen_len, rejected / rejected_len)[0]
    x = PairLogps(chosen, rejected, torch.zeros(8), torch.zeros(8), chosen_len, rejected_len)
    got = LOSSES["simpo"](x, LossParams(beta=2.0, simpo_gamma=0.7))
    assert torch.allclose(got, expected, atol=1e-5)


def test_ld_weights_by_hand():
    """Two pairs; chosen lengths 3 and 1, rejected 2 and 2 -> shared lengths 2 and 1. Positions in the plain
    layout's order (chosen 0, chosen 1, rejected 0, rejected 1): the third chosen-0 token and the second
    rejected-1 token are past the shorter response and weigh alpha."""
    from dpo_lightning.model.logprobs import ld_weights

    out_index = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3])
    tokens = torch.tensor([3, 1, 2, 2])
    assert ld_weights(out_index, tokens, 0.25).tolist() == [1, 1, 0.25, 1, 1, 1, 1, 0.25]
    shared_order = torch.tensor([0, 0, 0, 2, 2, 1, 3, 3])  # the prefix-sharing layout: chosen then rejected per pair
    assert ld_weights(shared_order, tokens, 0.25).tolist() == [1, 1, 0.25, 1, 1, 1, 1, 0.25]


def test_the_loss_registry_is_keyed_by_the_literal_names_in_their_order():
    from typing import get_args

    from dpo_lightning.losses import PAIRWISE_LOSSES, LossName

    assert list(LOSSES) == list(get_args(LossName))  # the Literal is the one list of names; --help shows it
    assert set(LOSSES) - PAIRWISE_LOSSES == {"aot", "aot_unpaired"}
