"""reward.py's pure functions against hand computations: the Bradley-Terry loss and the reward read
at the last real token."""
import math

import pytest
import torch

from reward import bt_loss, last_token_index, rewards_at_last_token


def softplus(x):
    """log(1 + exp(x)) on a python float, stable for any x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def test_bt_loss_hand_values():
    """bt_loss is the mean of log(1 + exp(-g)) over the gaps g = chosen - rejected."""
    chosen, rejected = torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.0, 2.0, -0.5])
    gaps = [1.0, -2.0, 0.0]
    expected = sum(math.log(1 + math.exp(-g)) for g in gaps) / len(gaps)
    assert bt_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_bt_loss_equal_rewards_is_log2():
    """Equal rewards: the model is indifferent, the loss is log 2."""
    r = torch.tensor([0.3, -1.7, 5.0])
    assert bt_loss(r, r.clone()).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_bt_loss_finite_for_huge_gaps(gap):
    """A gap of +-1e4 gives a finite, correct loss (no exp overflow)."""
    loss = bt_loss(torch.tensor([gap]), torch.tensor([0.0])).item()
    assert math.isfinite(loss)
    assert loss == pytest.approx(softplus(-gap), rel=1e-3, abs=1e-6)


def test_bt_loss_gradient_direction():
    """Descending the loss raises the chosen reward and lowers the rejected one, by sigmoid(-g)/B."""
    chosen = torch.tensor([0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0], requires_grad=True)
    bt_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    expected = [-1 / (1 + math.exp(g)) / 2 for g in (0.5, -2.0)]  # d/dc of softplus(-g) / B
    assert chosen.grad.tolist() == pytest.approx(expected, rel=1e-5)
    assert rejected.grad.tolist() == pytest.approx([-e for e in expected], rel=1e-5)


MASKS = torch.tensor([
    [1, 1, 1, 0, 0],  # right-padded
    [0, 0, 1, 1, 1],  # left-padded
    [0, 1, 1, 0, 0],  # padded on both sides
    [1, 1, 1, 1, 1],  # no padding
    [1, 0, 0, 0, 0],  # a single real token at position 0
])


def test_last_token_index_all_paddings():
    """The index is the last position whose mask is 1, for every padding layout."""
    expected = [max(j for j, m in enumerate(row) if m) for row in MASKS.tolist()]
    assert expected == [2, 4, 2, 4, 0]
    assert last_token_index(MASKS).tolist() == expected


def test_rewards_at_last_token_reads_the_right_value():
    """rewards_at_last_token returns values[b, last real token of b]."""
    values = torch.arange(25, dtype=torch.float32).reshape(5, 5) * 10
    expected = [values[0, 2], values[1, 4], values[2, 2], values[3, 4], values[4, 0]]
    assert rewards_at_last_token(values, MASKS).tolist() == [v.item() for v in expected]
