"""SimPO and ORPO losses against their papers' formulas, with the numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from qalign.losses import log_odds, orpo_loss, simpo_loss


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# -- SimPO: -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma) ----------------------------


def test_simpo_matches_hand_computed_values():
    """beta 2, gamma 0.5.
    Pair 1: means -0.5 and -1.5: 2 * (-0.5 - -1.5) - 0.5 = 2 - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.201413...
    Pair 2: means -2 and -1:     2 * (-2 - -1) - 0.5 = -2.5           -> log(1 + e^2.5) = 2.578890...
    Rewards beta * mean: 2 * -0.5 = -1, 2 * -1.5 = -3; 2 * -2 = -4, 2 * -1 = -2."""
    losses, chosen, rejected = simpo_loss(t(-0.5, -2.0), t(-1.5, -1.0), beta=2.0, gamma=0.5)
    assert losses.tolist() == pytest.approx(
        [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(2.5))], abs=1e-12
    )
    assert losses.tolist() == pytest.approx([0.2014132779827524, 2.5788897342925496], abs=1e-12)
    assert chosen.tolist() == [-1.0, -4.0] and rejected.tolist() == [-3.0, -2.0]


def test_simpo_gamma_is_a_margin_the_rewards_must_clear():
    """Equal means: 2 * 0 - gamma. gamma 0 -> log 2 (= DPO's start); gamma 0.5 -> log(1 + e^0.5) = 0.974077,
    more than log 2 = 0.693147: a tie still costs, the chosen reply must win by gamma / beta nats per token."""
    assert simpo_loss(t(-1.0), t(-1.0), 2.0, 0.0)[0].item() == pytest.approx(math.log(2), abs=1e-12)
    assert simpo_loss(t(-1.0), t(-1.0), 2.0, 0.5)[0].item() == pytest.approx(0.9740769841801067, abs=1e-12)


def test_simpo_gradient_and_detached_rewards():
    """d/dc of -log sigmoid(beta * (c - r) - gamma) = -beta * sigmoid(-(beta * (c - r) - gamma)); at
    beta * (c - r) - gamma = 1.5: -2 / (1 + e^1.5) = -0.364492...; the rejected side gets the opposite."""
    chosen, rejected = t(-0.5).requires_grad_(), t(-1.5).requires_grad_()
    losses, chosen_rewards, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-2 / (1 + math.exp(1.5)), abs=1e-12)
    assert rejected.grad.item() == pytest.approx(2 / (1 + math.exp(1.5)), abs=1e-12)


# -- ORPO: -mean log p(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected)) ---------------------


def test_orpo_matches_hand_computed_values():
    """Means are logs of the per-token geometric-mean probability p, and odds = p / (1 - p).
    Pair 1: p 0.5 and 0.2 -> odds 1 and 0.25 -> log odds ratio log 4 = 1.386294; sigmoid(log 4) = 4 / 5, so
        the odds-ratio term is -log 0.8 = 0.223144; NLL = -log 0.5 = 0.693147; beta 0.1:
        0.693147 + 0.1 * 0.223144 = 0.715462.
    Pair 2: p 0.25 and 0.75 -> odds 1/3 and 3 -> ratio log(1/9) = -2.197225; sigmoid = 1 / (1 + 9) = 0.1, so
        the term is log 10 = 2.302585; NLL = log 4 = 1.386294; 1.386294 + 0.1 * 2.302585 = 1.616553."""
    losses, nll, ratio = orpo_loss(
        t(math.log(0.5), math.log(0.25)), t(math.log(0.2), math.log(0.75)), beta=0.1
    )
    assert losses.tolist() == pytest.approx(
        [math.log(2) + 0.1 * -math.log(0.8), math.log(4) + 0.1 * math.log(10)], abs=1e-12
    )
    assert losses.tolist() == pytest.approx([0.7154615356913663, 1.6165528704192952], abs=1e-12)
    assert nll.tolist() == pytest.approx([math.log(2), math.log(4)], abs=1e-12)
    assert ratio.tolist() == pytest.approx([math.log(4), -math.log(9)], abs=1e-12)


def test_orpo_gradient():
    """At p = 0.5, d/dx log odds(x) = 1 + p / (1 - p) = 1 / (1 - p) = 2 (x = log p). The chosen side:
    d NLL = -1; d(-beta log sigmoid(ratio)) = -beta * sigmoid(-ratio) * 2 = -0.1 * 0.2 * 2 = -0.04 (with
    sigmoid(-log 4) = 1 / 5). Total -1.04. The rejected side (p 0.2): +0.1 * 0.2 * 1 / 0.8 = 0.025."""
    chosen, rejected = t(math.log(0.5)).requires_grad_(), t(math.log(0.2)).requires_grad_()
    losses, nll, ratio = orpo_loss(chosen, rejected, beta=0.1)
    assert not nll.requires_grad and not ratio.requires_grad
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-1.04, abs=1e-12)
    assert rejected.grad.item() == pytest.approx(0.025, abs=1e-12)


def test_log_odds_is_exact_near_certainty_in_fp32():
    """x = mean log p = -1e-6: 1 - p = -expm1(x) = 9.999995e-7, so log odds = x - log(-expm1(x))
    = -1e-6 + 13.815511 = 13.815510 (float64, below). In fp32 the naive log(1 - exp(x)) loses digits: fp32 is
    spaced 2^-24 = 5.96e-8 just below 1, so exp(-1e-6) rounds to 1 - 17 * 2^-24 and 1 - p comes out as
    1.0133e-6, 1.3% off: log odds 13.8023, 0.013 too low. expm1 keeps the 1e-6 itself."""
    x64 = t(-1e-6)
    exact = (x64 - torch.log(-torch.expm1(x64))).item()
    assert exact == pytest.approx(13.815510057964274, abs=1e-9)
    x32 = torch.tensor([-1e-6], dtype=torch.float32)
    assert log_odds(x32).item() == pytest.approx(exact, rel=1e-6)
    naive = (x32 - torch.log1p(-torch.exp(x32))).item()
    assert abs(naive - exact) > 0.01  # what the expm1 branch is for


def test_log_odds_far_from_certainty_and_at_it():
    """p = 0.2 (x = log 0.2, below -log 2: the log1p branch): log(0.2 / 0.8) = -log 4.
    x = -50: odds ~ p, so log odds ~ x: -50 - log1p(-e^-50) = -50 + 1.9e-22 = -50.
    x = 0 (a reply the model is certain of, p rounding to 1): finite, and no gradient (not NaN)."""
    assert log_odds(t(math.log(0.2))).item() == pytest.approx(-math.log(4), abs=1e-12)
    assert log_odds(t(-50.0)).item() == pytest.approx(-50.0, abs=1e-12)
    certain = torch.zeros(1, dtype=torch.float32, requires_grad=True)
    value = log_odds(certain)
    assert torch.isfinite(value).all() and value.item() == pytest.approx(15.94, abs=0.01)  # -log(fp32 eps)
    value.sum().backward()
    assert certain.grad.item() == 0.0
    losses, _, _ = orpo_loss(certain, torch.tensor([-1.0], requires_grad=True), beta=0.1)
    assert torch.isfinite(losses).all()
