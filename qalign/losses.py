"""Losses: pure functions of log-probabilities. Metrics are computed by the callers, next to them."""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Mean negative log-likelihood per trained token of a whole optimizer step.

    `num_tokens` counts the trained tokens of every micro-batch in the step, so that gradient accumulation
    weights each token equally (dividing by each micro-batch's own count would overweight short batches).
    """
    return -token_logps.sum() / max(num_tokens, 1)
