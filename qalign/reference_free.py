"""The DPO stage's reference-free objectives, SimPO and ORPO: the step loss scores the policy alone, from each
reply's mean log-prob per trained token, so there is no reference adapter, no reference pass and no cache."""

from __future__ import annotations

import torch

from qalign.losses import orpo_loss, simpo_loss
from qalign.recipe import DpoSpec


def make_reference_free_step(spec: DpoSpec):
    """The step loss for dpo.loss simpo or orpo: this micro-batch's share of the step's mean loss and metrics.

    Every metric is a per-pair mean over the whole optimizer step (each share divided by `norm`, the step's
    pairs), as for DPO: rewards/* are beta * the mean token log-prob (SimPO's reward; for ORPO, the same
    quantity TRL logs), logps/* the summed log-probs, as DPO logs them. ORPO also logs `nll` (its SFT term: the
    chosen reply's mean NLL per token) and `log_odds_ratio` (log odds(chosen) - log odds(rejected))."""
    from qalign.dpo import pair_metrics, sequence_logprobs

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor], norm: int) -> tuple[torch.Tensor, dict]:
        half = batch["input_ids"].shape[0]
        sums, counts = sequence_logprobs(model, batch)
        means = sums / counts.clamp(min=1)
        chosen, rejected = means[:half], means[half:]
        extra = {}
        if spec.loss == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(
                chosen, rejected, spec.beta, spec.simpo_gamma
            )
        elif spec.loss == "orpo":
            losses, nll, ratio = orpo_loss(chosen, rejected, spec.beta)
            chosen_rewards, rejected_rewards = spec.beta * chosen.detach(), spec.beta * rejected.detach()
            extra = {"nll": nll.sum() / norm, "log_odds_ratio": ratio.sum() / norm}
        else:
            raise ValueError(f"dpo.loss {spec.loss} needs a reference model")
        loss = losses.sum() / norm
        return loss, {**pair_metrics(loss, chosen_rewards, rejected_rewards, sums, norm), **extra}

    return step


def describe_objective(spec: DpoSpec) -> str:
    """One line for `qalign validate`: the objective and the settings it reads."""
    if spec.loss == "simpo":
        return (
            f"objective: simpo (SimPO, reference-free: no reference pass, nothing cached), beta {spec.beta:g}, "
            f"simpo_gamma {spec.simpo_gamma:g}"
        )
    if spec.loss == "orpo":
        return (
            f"objective: orpo (ORPO, reference-free: no reference pass, nothing cached; SFT's NLL on the chosen "
            f"reply plus beta * the odds-ratio term), beta {spec.beta:g}"
        )
    smoothing = f", label_smoothing {spec.label_smoothing:g}" if spec.loss == "sigmoid" else ""
    if spec.rpo_alpha:
        smoothing += f", rpo_alpha {spec.rpo_alpha:g} (the chosen reply's NLL added)"
    reference = "precomputed once and cached" if spec.reference == "precompute" else "live, every step"
    return f"objective: {spec.loss}, beta {spec.beta:g}{smoothing}; reference log-probs {reference}"
