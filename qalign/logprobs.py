"""Log-probabilities of the trained tokens, computed only where they are needed.

The LM head runs on the hidden states of trained positions alone (prompt and padding positions never reach
the vocabulary projection), in chunks bounded by bytes of logits, inside one autograd function
(_TrainedTokenLogprobs): no [tokens x vocab] tensor outlives its chunk, in the forward or the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qalign.chat_template import IGNORE

MiB = 2**20
# fp32 logits per chunk of the LM head. A byte budget rather than a token count, so a 256k vocabulary stays as
# bounded as a 32k one; 64 MiB is 2048 tokens of an 8k vocabulary (the chunk this code used before) and about
# 128 of Llama 3's 128k, still a full matrix multiply for a GPU.
LOGITS_CHUNK_BYTES = 64 * MiB


def chunk_tokens(vocab: int, budget: int | None = None) -> int:
    """Tokens per LM-head chunk: as many as fit the budget of fp32 logits, a multiple of 64 when above it
    (whole tiles for a GPU's matrix units)."""
    tokens = max(1, (LOGITS_CHUNK_BYTES if budget is None else budget) // (4 * vocab))
    return tokens if tokens < 64 else tokens // 64 * 64


class DecoderCall(torch.nn.Module):
    """A model's decoder as a module of its own, holding the whole model: what DistributedDataParallel wraps.
    The loss runs the LM head itself, on trained positions only, so a wrapper around the whole model would never
    see a forward; DDP's gradient hooks sit on every trainable parameter either way, the head's included."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: object) -> object:
        return base_model(self.model).get_decoder()(**kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The (peft) model under a DistributedDataParallel wrapper, or the model itself."""
    inner = getattr(model, "module", None)
    return inner.model if isinstance(inner, DecoderCall) else model


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under peft's and DDP's wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """What runs the decoder: the DDP wrapper when there is one (its forward is what arms the gradient sync)."""
    return (
        model if isinstance(getattr(model, "module", None), DecoderCall) else base_model(model).get_decoder()
    )


def label_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    packed: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each trained token [N] in fp32, the batch row each belongs to [N]).

    Labels are aligned with input_ids (IGNORE where not trained); position t predicts labels[t + 1]. `packed`
    (packing.forward_kwargs) runs a packed row: it replaces attention_mask.
    """
    base = base_model(model)
    hidden = _hidden_states(model, base, input_ids, attention_mask, position_ids, packed)
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
    packed: dict | None = None,
) -> torch.Tensor:
    """log p(targets[i]) [N] in fp32, each predicted by the hidden state at flat position sources[i] of the
    [batch * length] tokens: for layouts where the predicting token is not simply the previous one."""
    base = base_model(model)
    hidden = _hidden_states(model, base, input_ids, attention_mask, position_ids, packed)
    return selective_logprobs(base, hidden.flatten(0, 1)[sources], targets)


def _hidden_states(
    model: torch.nn.Module,
    base: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    packed: dict | None,
) -> torch.Tensor:
    inputs = {"attention_mask": attention_mask, **(packed or {})}
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if packed is not None:
        from qalign.packing import segmented_calls

        before = segmented_calls()
    hidden = _decoder(model)(input_ids=input_ids, use_cache=False, **inputs)
    if packed is not None and segmented_calls() == before:
        from qalign.errors import UserError

        raise UserError(
            f"packing: {type(base).__name__}'s attention does not run through transformers' attention "
            "functions, so packed examples would not be kept apart; set packing: false"
        )
    return hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]


def selective_logprobs(base: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(hidden))[target] for [N, H] hidden states, chunked over N."""
    head = base.get_output_embeddings()
    config = base.config
    chunk = chunk_tokens(head.weight.shape[0])
    if type(head) is torch.nn.Linear:
        inputs = (hidden, head.weight, head.bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            return _TrainedTokenLogprobs.apply(hidden, head.weight, head.bias, targets, config, chunk)
        # No graph (reference passes, evaluation): the function would still be told its inputs need gradients
        # and compute them.
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            piece = slice(start, start + chunk)
            logps[piece] = _chunk(hidden[piece], head.weight, head.bias, targets[piece], config, False)[0]
        return logps
    # Anything else (an adapter or a quantized layer on the head) goes through its own module, whose logits
    # autograd keeps per chunk: correct, only not as lean.
    out = []
    for start in range(0, hidden.shape[0], chunk):
        logits = _model_logit_transform(config, head(hidden[start : start + chunk]).float())
        out.append(-F.cross_entropy(logits, targets[start : start + chunk], reduction="none"))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class _TrainedTokenLogprobs(torch.autograd.Function):
    """log softmax(transform(hidden @ weight.T + bias))[target], chunk by chunk.

    d(-log p) / d logits is (softmax - onehot(target)), which does not depend on the gradient that will
    arrive, so the forward turns each chunk's logits into that and on into the hidden state's gradient per unit
    upstream gradient ([N, H], as small as the hidden states), and drops the logits. The backward only scales
    it: the head's matrix multiply runs twice per step, as for plain autograd, and no logits are kept. Only a
    trainable head (tied embeddings being trained, say) has its logits recomputed in the backward, one chunk
    at a time, for the weight's gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, config, chunk):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        unit_grad = torch.empty_like(hidden) if need_hidden else None
        for start in range(0, hidden.shape[0], chunk):
            piece = slice(start, start + chunk)
            logps[piece], dlogits = _chunk(hidden[piece], weight, bias, targets[piece], config, need_hidden)
            if dlogits is not None:
                # (mm with out= is about a quarter slower on a CPU than a plain mm and a copy of its result)
                unit_grad[piece] = torch.mm(dlogits.to(weight.dtype), weight)
            del dlogits  # before the next chunk's logits exist, not after
        keep_inputs = need_weight or need_bias
        ctx.save_for_backward(
            unit_grad,
            hidden if keep_inputs else None,
            weight if keep_inputs else None,
            bias if keep_inputs else None,
            targets if keep_inputs else None,
        )
        ctx.config, ctx.chunk = config, chunk
        return logps

    @staticmethod
    def backward(ctx, grad):
        unit_grad, hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = grad_weight = grad_bias = None
        if unit_grad is not None:
            grad_hidden = (unit_grad.float() * -grad.unsqueeze(1)).to(unit_grad.dtype)
        if weight is not None:
            grad_weight = torch.zeros_like(weight)
            grad_bias = torch.zeros_like(bias) if bias is not None else None
            for start in range(0, hidden.shape[0], ctx.chunk):
                piece = slice(start, start + ctx.chunk)
                _, dlogits = _chunk(hidden[piece], weight, bias, targets[piece], ctx.config, True)
                dlogits = dlogits.mul_(-grad[piece].unsqueeze(1)).to(weight.dtype)
                grad_weight.addmm_(dlogits.t(), hidden[piece])
                if grad_bias is not None:
                    grad_bias += dlogits.sum(0)
                del dlogits
            grad_weight = grad_weight if ctx.needs_input_grad[1] else None
            grad_bias = grad_bias if ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    config: object,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p of each target [C], d(-log p) / d head output [C, V] in fp32 or None). At most two fp32 logits-sized
    buffers at once (three with softcapping): the logits and their log-softmax, which then turns in place into
    the gradient."""
    logits = F.linear(hidden, weight, bias).float()
    logits, slope = _transform_with_slope(config, logits, want_grad)
    # cross_entropy's own log-softmax, so the values are its values to the bit; on a CPU it is also faster
    # than a max, exp and sum spelled out in place.
    log_probs = torch.log_softmax(logits, dim=1)
    del logits
    logps = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    if not want_grad:
        return logps, None
    # The gradient of -log p, not of log p: softmax - onehot needs no pass to negate [C, V] (the backward
    # negates the upstream gradient, [N], instead).
    dlogits = log_probs.exp_()
    dlogits.scatter_add_(1, targets.unsqueeze(1), torch.full_like(logps, -1).unsqueeze(1))
    if isinstance(slope, torch.Tensor) or slope != 1:
        dlogits.mul_(slope)
    return logps, dlogits


def _transform_with_slope(
    config: object, logits: torch.Tensor, want_slope: bool
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """_model_logit_transform, in place where it can be, with its derivative (a number, or a tensor with
    softcapping) for the chain rule."""
    slope: torch.Tensor | float = 1.0
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, int | float) and scale != 1:
        logits = logits.mul_(scale)
        slope *= scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, int | float) and scaling != 1:
        logits = logits.div_(scaling)
        slope /= scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        squashed = logits.div_(cap).tanh_()
        logits = squashed * cap
        if want_slope:
            # d(cap * tanh(x / cap))/dx = 1 - tanh(x / cap)^2, times the constant factors before it.
            slope = squashed.square_().neg_().add_(1).mul_(slope)
    return logits, slope


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
