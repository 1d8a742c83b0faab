"""Losses: pure functions of log-probabilities. Metrics are computed by the callers, next to them."""

from __future__ import annotations

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
