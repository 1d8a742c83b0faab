"""Padding-free micro-batches: a micro-batch's examples laid end to end in one row.

Positions restart at each example and attention never crosses one: transformers' `sdpa` attention is wrapped
so that a forward given `PACKED` segments runs SDPA once per segment (causal, or the segment's own additive
mask for a DPO pair). Nothing is computed for padding, and no [tokens x tokens] mask is built for the row: the
attention costs sum(L_i^2), as in padded rows, not (sum L_i)^2. Any other forward goes to transformers' own
function untouched.

The segments travel in the forward's keyword arguments, which transformers hands to every attention call and
which gradient checkpointing keeps for its recomputation, so a recomputed layer sees the same segments.

On a CPU in bf16 or fp16 each segment's attention (and a whole padded row's) runs on a whole number of
SEGMENT_BLOCK tokens, zeros after its end. torch's
CPU flash attention builds a oneDNN kernel per (query, key) length it meets and keeps them all, per thread, for
the life of the process (about 7 MiB per new length in bf16, forward and backward, on a 2-core AMX Xeon); every
example of a packed row is a length of its own, where a padded micro-batch has one length, so without the
blocks the resident memory of a packed run grew by several times what its activations take
(benchmarks/packing_memory.py). The extra keys come after every real query, so the causal mask (or the pair's
mask, padded with masked columns) keeps them out, and the extra queries' outputs are dropped: the attention of
the real tokens is unchanged (to rounding, which is why fp32, whose kernels are not kept that way, is left as
it was).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from qalign.errors import UserError
from qalign.recipe import Recipe, TrainSpec

if TYPE_CHECKING:
    from qalign.memory import Lengths
    from qalign.model_shapes import Architecture

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


SEGMENT_BLOCK = 64
"""On a CPU, segments attend in multiples of this many tokens (see above): a 300-token example and its rows
cost at most 63 more keys and queries in attention only, and the lengths torch's kernel cache meets stay few."""


def attention_length(length: int, device: torch.device, dtype: torch.dtype) -> int:
    """The length a segment of `length` tokens runs its attention at on `device` in `dtype`: whole blocks on a
    CPU in bf16 or fp16, whose kernels torch keeps per length; fp32's it does not keep (80 lengths: 17 MiB
    against bf16's 556), and fp32 runs stay exactly what they were."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return length
    return -(-length // SEGMENT_BLOCK) * SEGMENT_BLOCK


def forward_kwargs(
    ends: Sequence[int], masks: Sequence[torch.Tensor | None] | None = None
) -> dict[str, object]:
    """The decoder's extra arguments for a packed row whose examples end at `ends` (exclusive, ascending).
    Each mask is padded here, once for every layer, to the length its segment's attention runs at."""
    starts = [0, *ends[:-1]]
    masks = [None] * len(ends) if masks is None else [_padded_mask(m) for m in masks]
    return {"attention_mask": _PREPARED, PACKED: tuple(zip(starts, ends, masks, strict=True))}


def _padded_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A segment's [1, 1, n, n] additive mask at its attention length: the extra keys masked for every real
    query; the extra queries (whose outputs are dropped) see every key, so their softmax stays finite."""
    if mask is None:
        return None
    n = mask.shape[-1]
    extra = attention_length(n, mask.device, mask.dtype) - n
    if extra == 0:
        return mask
    mask = F.pad(mask, (0, extra), value=torch.finfo(mask.dtype).min)
    return F.pad(mask, (0, 0, 0, extra), value=0.0)


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
        return _blocked_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    unsupported = [k for k in ("softcap", "s_aux", "position_bias") if kwargs.get(k) is not None]
    if unsupported or query.shape[0] != 1:
        raise RuntimeError(f"packed rows cannot run this attention ({', '.join(unsupported) or 'batch > 1'})")
    _CALLS[0] += 1
    groups = getattr(module, "num_key_value_groups", 1)
    outputs = []
    for start, end, mask in segments:
        n = end - start
        size = mask.shape[-1] if mask is not None else attention_length(n, query.device, query.dtype)
        parts = [t[:, :, start:end] for t in (query, key, value)]
        if size > n:
            parts = [F.pad(t, (0, 0, 0, size - n)) for t in parts]
        attended = F.scaled_dot_product_attention(
            *parts,
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=mask is None and size > 1,
            enable_gqa=groups > 1,
        )
        outputs.append(attended[:, :, :n])
    # [1, heads, T, dim] -> [1, T, heads, dim], the layout transformers' attention functions return.
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_SDPA = sdpa_attention_forward


def _blocked_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: object,
    **kwargs: object,
) -> tuple[torch.Tensor, object]:
    """transformers' sdpa for a whole (padded) row, which on a CPU in bf16 or fp16 also attends in whole blocks:
    the lengths of padded micro-batches vary as much as examples do, and torch keeps a kernel for each (fp32's
    kernels are not kept that way). Self-attention over the row only (training, eval, a prefill); a decoding
    step, a bidirectional attention without a mask or a position bias runs as it comes."""
    n = query.shape[2]
    size = attention_length(n, query.device, query.dtype)
    if (
        size == n
        or key.shape[2] != n
        or kwargs.get("position_bias") is not None
        or (attention_mask is None and not getattr(module, "is_causal", True))
        or (attention_mask is not None and attention_mask.shape[-1] != n)
    ):
        return _SDPA(module, query, key, value, attention_mask, *args, **kwargs)
    extra = size - n
    query, key, value = (F.pad(t, (0, 0, 0, extra)) for t in (query, key, value))
    if attention_mask is not None:
        # The extra keys masked for every query; extra queries (a row of their own, when the mask has one per
        # query) see every key, so that no softmax row is empty. Without a mask the causal flag does the same.
        boolean = attention_mask.dtype == torch.bool
        masked = False if boolean else torch.finfo(attention_mask.dtype).min
        attention_mask = F.pad(attention_mask, (0, extra), value=masked)
        if attention_mask.shape[-2] == n:
            attention_mask = F.pad(attention_mask, (0, 0, 0, extra), value=True if boolean else 0.0)
    output, weights = _SDPA(module, query, key, value, attention_mask, *args, **kwargs)
    return output[:, :n], weights  # [batch, tokens, heads, dim]


AttentionInterface.register("sdpa", _segmented_sdpa)
_CALLS = [0]


def segmented_calls() -> int:
    """How many attention calls have run per segment so far: a packed forward that adds none ran an attention
    of its model's own, which never saw the segments (see logprobs._hidden_states)."""
    return _CALLS[0]


def check_model(config: object, stage: str, packing: bool, length: int) -> None:
    """The loaded model can run the packed rows the plan chose (the plan reads the config without loading)."""
    blocker = config_blocker(config, length) if packing else ""
    if blocker:
        raise UserError(f"{stage}.packing: the loaded model has {blocker}; set {stage}.packing to false")


def packs(
    arch: Architecture, recipe: Recipe, stage: str, lengths: Lengths, batch: int, default: bool = True
) -> tuple[bool, str]:
    """(whether the stage's micro-batches are packed, why not when they are not) for `packing: auto`; true
    and false stand. `default`: apply auto's choice of where packing pays, beside what the model can take."""
    spec: TrainSpec = getattr(recipe, stage)
    if stage == "dpo" and recipe.dpo is not None and recipe.dpo.loss == "kto":
        # KTO's rows have their own collate (a row and its mismatched completion); it has no packed layout.
        return False, "KTO's rows are not packed"
    if isinstance(spec.packing, bool):
        return spec.packing, "" if spec.packing else "packing: false"
    if batch <= 1:
        return False, "batch_size 1 has no padding to drop"
    longest = (
        (lengths.longest_pair or 2 * spec.max_length)
        if stage == "dpo"
        else (lengths.longest or spec.max_length)
    )
    blocker = packing_blocker(
        recipe.model.attn_implementation or arch.attention, arch.sliding_window, None, longest
    )
    if not blocker and stage == "dpo" and default:
        # Measured in `make bench` (benchmarks/RESULTS_PACKING.md): a pair's row already shares its prompt and
        # keeps little padding; packed pairs ran at 0.96x the padded speed with the same training memory once
        # CPU attention ran in whole blocks (1.10x and 1.7x the memory before). dpo.packing: true packs them.
        return False, "DPO's pair rows keep little padding (dpo.packing: true packs them)"
    return not blocker, blocker


def check_packing(arch: Architecture, recipe: Recipe, stage: str, lengths: Lengths) -> None:
    """`packing: true` on a model whose attention cannot keep packed examples apart is an error."""
    spec: TrainSpec = getattr(recipe, stage)
    auto = recipe.model_copy(update={stage: spec.model_copy(update={"packing": "auto"})})
    on, why = packs(arch, auto, stage, lengths, 2, default=False)
    if not on:
        raise UserError(
            f"{recipe.source}: {stage}.packing: true, but {why}; set {stage}.packing to auto or false"
        )


def packing_line(recipe: Recipe, stage: str, examples: list) -> str:
    """`qalign validate`'s line on the stage's layout: what `packing: auto` resolves to for this model and data
    (`packing: true` where the attention cannot take it is an error here, as at the start of a run)."""
    from qalign.memory import lengths_of
    from qalign.model_shapes import describe, load_config

    spec: TrainSpec = getattr(recipe, stage)
    if spec.packing is False:
        return f"{stage}.packing: false (padded rows)"
    try:
        config, source = load_config(recipe.model)
        arch = describe(config, recipe.model, source)
    except (UserError, ValueError, ImportError) as exc:
        return f"{stage}.packing: {spec.packing} (decided when the run starts; the model config: {exc})"
    lengths = lengths_of(examples, stage)
    if spec.packing is True:
        check_packing(arch, recipe, stage, lengths)
        return f"{stage}.packing: true (one row per micro-batch, no padding)"
    batch = spec.batch_size if isinstance(spec.batch_size, int) else 2
    on, why = packs(arch, recipe, stage, lengths, batch)
    when = " if batch_size auto resolves above 1" if spec.batch_size == "auto" else ""
    return f"{stage}.packing: auto -> {str(on).lower()}" + (f" ({why})" if why else when)
