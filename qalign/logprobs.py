"""Log-probabilities of the trained tokens, computed only where they are needed.

The LM head runs on the hidden states of trained positions alone (prompt and padding positions never reach
the vocabulary projection), and the log-softmax of the target is taken in chunks, so
no full fp32 [batch, length, vocab] tensor is ever built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qalign.chat_template import IGNORE

CHUNK_TOKENS = 2048


def label_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each trained token [N] in fp32, the batch row each belongs to [N]).

    Labels are aligned with input_ids (IGNORE where not trained); position t predicts labels[t + 1].
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[keep]
    return selective_logprobs(base, hidden[:, :-1][keep], targets[keep]), rows


def gathered_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    sources: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """log p(targets[i]) [N] in fp32, each predicted by the hidden state at flat position sources[i] of the
    [batch * length] tokens: for layouts where the predicting token is not simply the previous one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    return selective_logprobs(base, hidden.flatten(0, 1)[sources], targets)


def selective_logprobs(base: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] for [N, H] hidden states, chunked over N."""
    head = base.get_output_embeddings()
    config = base.config
    out = []
    for start in range(0, hidden.shape[0], CHUNK_TOKENS):
        logits = head(hidden[start : start + CHUNK_TOKENS]).float()
        logits = _model_logit_transform(config, logits)
        # cross_entropy is -log_softmax[target] in one fused kernel (forward and backward): on a CPU about
        # 10% faster than gather minus logsumexp, whose backward builds several logits-sized temporaries.
        out.append(-F.cross_entropy(logits, targets[start : start + CHUNK_TOKENS], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _model_logit_transform(config: object, logits: torch.Tensor) -> torch.Tensor:
    """What some architectures do to logits after the head inside their own forward (which we bypass)."""
    scale = getattr(config, "logit_scale", None)  # Cohere
    if isinstance(scale, int | float) and scale != 1:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)  # Granite divides
    if isinstance(scaling, int | float) and scaling != 1:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
