"""DPO losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qalign.losses import chosen_nll, dpo_loss


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_matches_hand_computed_values():
    """policy chosen -10, rejected -20; reference chosen -12, rejected -18.
    h = (-10 - -12) - (-20 - -18) = 2 - (-2) = 4; beta = 0.5 so beta*h = 2.
    loss = -log sigmoid(2) = log(1 + e^-2) = 0.126928011...
    rewards: chosen 0.5 * 2 = 1.0, rejected 0.5 * -2 = -1.0."""
    losses, chosen, rejected = dpo_loss(t(-10.0), t(-20.0), t(-12.0), t(-18.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-12)
    assert losses.item() == pytest.approx(0.1269280110429725, abs=1e-12)
    assert chosen.item() == 1.0 and rejected.item() == -1.0


def test_label_smoothing_mixes_in_the_flipped_label():
    """Same pair (beta*h = 2), e = 0.1:
    0.9 * log(1 + e^-2) + 0.1 * log(1 + e^2) = 0.9 * 0.126928 + 0.1 * 2.126928 = 0.114235 + 0.212693 = 0.326928."""
    losses, _, _ = dpo_loss(t(-10.0), t(-20.0), t(-12.0), t(-18.0), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * 0.1269280110429725 + 0.1 * 2.1269280110429727, abs=1e-12)
    assert losses.item() == pytest.approx(0.3269280110429725, abs=1e-12)


def test_hinge():
    """beta*h = 2 -> relu(1 - 2) = 0; with h = 1 and beta 0.5: relu(1 - 0.5) = 0.5."""
    losses, _, _ = dpo_loss(
        t(-10.0, -5.0), t(-20.0, -6.0), t(-12.0, -5.0), t(-18.0, -5.0), beta=0.5, loss_type="hinge"
    )
    assert losses.tolist() == [0.0, 0.5]


def test_ipo():
    """h = 4, beta = 0.5 -> (4 - 1/(2*0.5))^2 = (4 - 1)^2 = 9; with h = 1: (1 - 1)^2 = 0."""
    losses, _, _ = dpo_loss(
        t(-10.0, -5.0), t(-20.0, -6.0), t(-12.0, -5.0), t(-18.0, -5.0), beta=0.5, loss_type="ipo"
    )
    assert losses.tolist() == [9.0, 0.0]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(smoothing):
    logps_c, logps_r = t(-3.5, -40.25), t(-7.0, -2.0)
    losses, chosen, rejected = dpo_loss(
        logps_c, logps_r, logps_c, logps_r, beta=0.1, label_smoothing=smoothing
    )
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(chosen, torch.zeros_like(chosen)) and torch.equal(rejected, torch.zeros_like(rejected))


def test_rewards_carry_no_gradient_and_the_loss_does():
    policy_c = t(-10.0).requires_grad_()
    losses, chosen, _ = dpo_loss(policy_c, t(-20.0), t(-12.0), t(-18.0), beta=0.5)
    assert not chosen.requires_grad
    losses.sum().backward()
    # d/dx of -log sigmoid(beta*h) w.r.t. policy_chosen = -beta * sigmoid(-beta*h) = -0.5 * sigmoid(-2)
    assert policy_c.grad.item() == pytest.approx(-0.5 / (1 + math.exp(2)), abs=1e-12)


def test_unknown_loss_type():
    with pytest.raises(ValueError):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="kto")


def test_chosen_nll_is_the_mean_per_token():
    """RPO's term: summed log-probs -6 over 3 tokens and -2 over 4 -> 6/3 = 2 and 2/4 = 0.5; an empty reply
    (0 tokens, sum 0) counts as one token, 0, not a division by zero."""
    assert chosen_nll(t(-6.0, -2.0, 0.0), torch.tensor([3, 4, 0])).tolist() == [2.0, 0.5, 0.0]
