"""dpo.py's loss against hand computations: the sigmoid and IPO losses, their gradients and the
implicit rewards."""
import math

import pytest
import torch

from dpo import dpo_loss


def softplus(x):
    """log(1 + exp(x)) on a python float, stable for any x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def log_sigmoid(x):
    return -softplus(-x)


PC, PR, RC, RR = [-1.0, -3.0], [-2.0, -1.5], [-1.5, -2.0], [-1.0, -2.5]  # policy / reference logps


def dpo_args(requires_grad=False):
    return [torch.tensor(x, dtype=torch.float64, requires_grad=requires_grad) for x in (PC, PR, RC, RR)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_hand_values(beta, eps):
    """sigmoid loss = -(1-eps) log sig(beta h) - eps log sig(-beta h), h on python floats."""
    losses, _, _ = dpo_loss(*dpo_args(), beta=beta, label_smoothing=eps)
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_is_log2_at_reference(eps):
    """When the policy equals the reference, h = 0 and the loss is log 2."""
    pc, pr = torch.tensor(PC), torch.tensor(PR)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1, label_smoothing=eps)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-6)
    assert cr.tolist() == [0.0, 0.0] and rr.tolist() == [0.0, 0.0]


def test_dpo_loss_gradient_direction():
    """Descending the loss raises log pi(y_w) and lowers log pi(y_l)."""
    pc, pr, rc, rr = dpo_args(requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_implicit_rewards_are_detached():
    """The returned rewards are beta (policy - reference), with no autograd history."""
    pc, pr, rc, rr = dpo_args(requires_grad=True)
    _, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert chosen_r.tolist() == pytest.approx([0.5 * (a - b) for a, b in zip(PC, RC)])
    assert rejected_r.tolist() == pytest.approx([0.5 * (a - b) for a, b in zip(PR, RR)])
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


NC, NR = [4.0, 10.0], [2.0, 5.0]  # the chosen and rejected responses' token counts


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_losses(beta):
    """ipo = (h' - 1 / (2 beta))^2 with each log-ratio per token (IPO's results, TRL);
    ipo_sum = (h - 1 / (2 beta))^2 on the sequences' sums."""
    counts = [torch.tensor(x, dtype=torch.float64) for x in (NC, NR)]
    per_token, _, _ = dpo_loss(*dpo_args(), beta=beta, loss_type="ipo", chosen_tokens=counts[0], rejected_tokens=counts[1])
    summed, _, _ = dpo_loss(*dpo_args(), beta=beta, loss_type="ipo_sum")
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        h_token = (PC[i] - RC[i]) / NC[i] - (PR[i] - RR[i]) / NR[i]
        assert summed[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-9)
        assert per_token[i].item() == pytest.approx((h_token - 1 / (2 * beta)) ** 2, rel=1e-9)


def test_dpo_unknown_loss_type_raises():
    """An unknown loss_type is a ValueError."""
    with pytest.raises(ValueError):
        dpo_loss(*dpo_args(), beta=0.1, loss_type="hinge-ish")


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_robust_dpo_loss_hand_values_and_unbiasedness(beta, eps):
    """robust = [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps), l(h) = -log sig(beta h) (Chowdhury et
    al. 2024); averaged over a label flipped with probability eps it is l(h) of the true label."""
    losses, _, _ = dpo_loss(*dpo_args(), beta=beta, label_smoothing=eps, loss_type="robust")
    swapped, _, _ = dpo_loss(*[dpo_args()[i] for i in (1, 0, 3, 2)], beta=beta, label_smoothing=eps,
                             loss_type="robust")  # the same pairs with chosen and rejected swapped: -h
    for i in range(2):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        l = lambda x: -log_sigmoid(beta * x)
        assert losses[i].item() == pytest.approx(((1 - eps) * l(h) - eps * l(-h)) / (1 - 2 * eps), rel=1e-9)
        assert ((1 - eps) * losses[i] + eps * swapped[i]).item() == pytest.approx(l(h), rel=1e-9)
