"""The KTO loss against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qalign.losses import kto_loss

LN3 = math.log(3)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_matches_hand_computed_values_and_trains_only_through_the_rows():
    """beta = 0.5, desirable_weight 2, undesirable_weight 1.
    KL side: policy [-3, -5] - reference [-4, -5] = [1, 0], mean 0.5 > 0, so z0 = 0.5.
    Rows (reference -10 each, policy = -10 + r):
      0 desirable,   r = z0 + 2 ln 3: beta (r - z0) = ln 3, sigmoid(ln 3) = 3/4, loss = 2 * (1 - 3/4) = 0.5
      1 undesirable, r = z0 + 2 ln 3: beta (z0 - r) = -ln 3, sigmoid = 1/4,     loss = 1 * (1 - 1/4) = 0.75
      2 undesirable, r = z0 - 2 ln 3: beta (z0 - r) = ln 3, sigmoid = 3/4,      loss = 1 * (1 - 3/4) = 0.25
      3 desirable,   r = z0:          sigmoid(0) = 1/2,                         loss = 2 * (1 - 1/2) = 1.0
    rewards = beta * r = [0.25 + ln 3, 0.25 + ln 3, 0.25 - ln 3, 0.25].
    Gradients of the summed loss: d/dr [w (1 - sigmoid(beta (r - z0)))] = -w beta s (1 - s):
      row 0: -2 * 0.5 * 3/4 * 1/4 = -0.1875; row 3: -2 * 0.5 * 1/2 * 1/2 = -0.25;
    d/dr [w (1 - sigmoid(beta (z0 - r)))] = +w beta s (1 - s): rows 1 and 2: 0.5 * 1/4 * 3/4 = 0.09375.
    z0 is detached: no gradient reaches the KL side."""
    r = [0.5 + 2 * LN3, 0.5 + 2 * LN3, 0.5 - 2 * LN3, 0.5]
    policy = t(*(-10 + x for x in r), grad=True)
    policy_kl = t(-3.0, -5.0, grad=True)
    desirable = torch.tensor([True, False, False, True])
    losses, rewards, z0 = kto_loss(
        policy, t(-10.0, -10.0, -10.0, -10.0), policy_kl, t(-4.0, -5.0), desirable, 0.5, 2.0, 1.0
    )
    assert z0.item() == pytest.approx(0.5, abs=1e-12)
    assert losses.tolist() == pytest.approx([0.5, 0.75, 0.25, 1.0], abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.25 + LN3, 0.25 + LN3, 0.25 - LN3, 0.25], abs=1e-12)
    assert not rewards.requires_grad and not z0.requires_grad
    losses.sum().backward()
    assert policy.grad.tolist() == pytest.approx([-0.1875, 0.09375, 0.09375, -0.25], abs=1e-12)
    assert policy_kl.grad is None


def test_a_negative_kl_estimate_is_clamped_to_zero():
    """KL side: [-6, -7] - [-5, -5] = [-1, -2], mean -1.5 < 0, so z0 = 0.
    Desirable row with r = 2 ln 3 and beta 0.5: 1 - sigmoid(ln 3) = 1/4 (weight 1);
    undesirable row with r = 2 ln 3: 1 - sigmoid(-ln 3) = 3/4, times weight 0.5 = 0.375."""
    losses, _, z0 = kto_loss(
        t(2 * LN3 - 1, 2 * LN3 - 1),
        t(-1.0, -1.0),
        t(-6.0, -7.0),
        t(-5.0, -5.0),
        torch.tensor([True, False]),
        0.5,
        1.0,
        0.5,
    )
    assert z0.item() == 0.0
    assert losses.tolist() == pytest.approx([0.25, 0.375], abs=1e-12)


def test_policy_equal_to_reference_gives_half_the_weight_and_zero_rewards():
    """r = 0 and z0 = 0: every row's loss is its weight times 1 - sigmoid(0) = 1/2."""
    logps, kl = t(-3.5, -40.25, -7.0), t(-2.0, -9.0, -1.0)
    losses, rewards, z0 = kto_loss(logps, logps, kl, kl, torch.tensor([True, False, True]), 0.1, 1.0, 1.5)
    assert losses.tolist() == [0.5, 0.75, 0.5]
    assert z0.item() == 0.0 and torch.equal(rewards, torch.zeros_like(rewards))
