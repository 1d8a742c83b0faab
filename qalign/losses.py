"""Losses: pure functions of log-probabilities. Metrics are computed by the callers, next to them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sft_loss(token_logps: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Mean negative log-likelihood per trained token of a whole optimizer step.

    `num_tokens` counts the trained tokens of every micro-batch in the step, so that gradient accumulation
    weights each token equally (dividing by each micro-batch's own count would overweight short batches).
    """
    return -token_logps.sum() / max(num_tokens, 1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference losses and the implicit rewards, from sequence log-probs of shape [B].

    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected), then
      sigmoid (DPO, Rafailov et al. 2023), with conservative label smoothing e:
          -(1 - e) * log sigmoid(beta * h) - e * log sigmoid(-beta * h)
      hinge (SLiC):  relu(1 - beta * h)
      ipo (Azar et al. 2023):  (h - 1 / (2 * beta)) ** 2, where the log-probs must be length-averaged
    Rewards are beta * (policy - reference), detached: they are metrics, not part of the graph.
    Returns (losses, chosen_rewards, rejected_rewards).
    """
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss '{loss_type}'")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen reply's negative log-likelihood per token, [B] from its summed log-probs and token counts:
    RPO's term (Pang et al. 2024), added to a pair's preference loss times `dpo.rpo_alpha`."""
    return -chosen_logps / chosen_tokens.clamp(min=1)


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    policy_kl: torch.Tensor,
    reference_kl: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses (Ethayarajh et al. 2024), the implicit rewards and the KL estimate.

    `policy`/`reference` [B] are each row's summed completion log-probs, `desirable` [B] its label;
    `policy_kl`/`reference_kl` [M] are the same for mismatched (prompt, other row's completion) pairs:
      r  = policy - reference
      z0 = max(0, mean(policy_kl - reference_kl)), detached: the reference point, not trained through
      desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
      undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))
    Rewards are beta * r, detached. Returns (losses, rewards, z0).
    """
    z0 = (policy_kl - reference_kl).mean().clamp(min=0).detach()
    r = policy - reference
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    return losses, beta * r.detach(), z0


def simpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024), from each reply's mean log-prob per trained token, shape [B]:
        -log sigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    No reference model: the implicit reward is the policy's own length-normalised log-prob, beta * mean, and
    gamma is the margin by which the chosen reward must beat the rejected one. The rewards are detached.
    Returns (losses, chosen_rewards, rejected_rewards)."""
    losses = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logps), without forming p: 1 - exp(x) cancels catastrophically as x
    nears 0 (a confident reply), so log(1 - p) is log(-expm1(x)) there and log1p(-exp(x)) below -log 2,
    each exact on its side. x is capped at -eps of its dtype: a reply whose p rounds to 1 gets a large finite
    log odds (about 15.9 in fp32) and no gradient, instead of inf and NaN."""
    x = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).eps)
    log_one_minus_p = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return x - log_one_minus_p


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024), from each reply's mean log-prob per trained token, shape [B]:
        -chosen_mean - beta * log sigmoid(log odds(chosen) - log odds(rejected))
    with odds(y) = p / (1 - p) and p = exp(mean log-prob), the paper's geometric-mean likelihood. The first
    term is SFT's NLL on the chosen reply, so ORPO needs no SFT stage before it; beta is the paper's lambda.
    Returns (losses, the NLL term, the log odds ratio), the last two detached (metrics)."""
    nll = -chosen_mean
    ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    losses = nll - beta * F.logsigmoid(ratio)
    return losses, nll.detach(), ratio.detach()
