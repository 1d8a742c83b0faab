"""Padding-free micro-batches: a micro-batch's examples laid end to end in one row.

Positions restart at each example and attention never crosses one: transformers' `sdpa` attention is wrapped
so that a forward given `PACKED` segments runs SDPA once per segment (causal, or the segment's own additive
mask for a DPO pair). Nothing is computed for padding, and no [tokens x tokens] mask is built for the row: the
attention costs sum(L_i^2), as in padded rows, not (sum L_i)^2. Any other forward goes to transformers' own
function untouched.

The segments travel in the forward's keyword arguments, which transformers hands to every attention call and
which gradient checkpointing keeps for its recomputation, so a recomputed layer sees the same segments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

PACKED = "qalign_packed_segments"
"""Forward keyword: a tuple of (start, end, additive mask [1, 1, n, n] or None for causal) per example."""

# A 4D attention_mask is taken as already prepared: transformers then builds no mask of its own for the row
# (it would otherwise detect the restarting positions and build a [T x T] block-diagonal one).
_PREPARED = torch.zeros(1, 1, 1, 1, dtype=torch.bool)


def packing_blocker(
    attention: str | None, sliding_window: int | None, softcap: float | None, length: int
) -> str:
    """Why a model cannot run packed rows whose examples have up to `length` tokens ('' when it can). The
    segmented attention replaces sdpa only; a sliding window shorter than an example or a soft-capped
    attention (Gemma 2) would not be applied."""
    if attention != "sdpa":
        return f"attention {attention}, not sdpa"
    if sliding_window is not None and sliding_window < length:
        return f"a sliding window of {sliding_window} tokens"
    if softcap:
        return "soft-capped attention"
    return ""


def config_blocker(config: object, length: int) -> str:
    """packing_blocker for a loaded model's config."""
    text = getattr(config, "text_config", None) or config
    return packing_blocker(
        getattr(config, "_attn_implementation", None),
        getattr(text, "sliding_window", None),
        getattr(text, "attn_logit_softcapping", None),
        length,
    )


def forward_kwargs(
    ends: Sequence[int], masks: Sequence[torch.Tensor | None] | None = None
) -> dict[str, object]:
    """The decoder's extra arguments for a packed row whose examples end at `ends` (exclusive, ascending)."""
    starts = [0, *ends[:-1]]
    masks = masks if masks is not None else [None] * len(ends)
    return {"attention_mask": _PREPARED, PACKED: tuple(zip(starts, ends, masks, strict=True))}


def _segmented_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    segments = kwargs.pop(PACKED, None)
    if segments is None:
        return _SDPA(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    unsupported = [k for k in ("softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    if unsupported or query.shape[0] != 1:
        raise RuntimeError(f"packed rows cannot run this attention ({', '.join(unsupported) or 'batch > 1'})")
    groups = getattr(module, "num_key_value_groups", 1)
    outputs = []
    for start, end, mask in segments:
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=mask is None and end - start > 1,
                enable_gqa=groups > 1,
            )
        )
    # [1, heads, T, dim] -> [1, T, heads, dim], the layout transformers' attention functions return.
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_SDPA = sdpa_attention_forward
AttentionInterface.register("sdpa", _segmented_sdpa)


def check_model(config: object, stage: str, packing: bool, length: int) -> None:
    """The loaded model can run the packed rows the plan chose (the plan reads the config without loading)."""
    from qalign.errors import UserError

    blocker = config_blocker(config, length) if packing else ""
    if blocker:
        raise UserError(f"{stage}.packing: the loaded model has {blocker}; set {stage}.packing to false")
