"""The memory planner's arithmetic: the peak memory of one training step (`qalign plan`; the `auto` settings
and suggestions built on it are in qalign/memory_auto.py).

Pure arithmetic on a model config, the recipe and the data's lengths: no weights are loaded. The parameter
parts are exact (qalign/model_shapes.py counts them on a parameter-free "meta" instance of the architecture,
in bitsandbytes' storage layout); activations count the tensors autograd saves in a Llama-style decoder layer
with LoRA (see _layer_bytes_per_token), checked against allocations measured on CPU in fp32 and bf16
(benchmarks/plan_accuracy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qalign.chat_template import IGNORE
from qalign.logprobs import chunk_tokens
from qalign.model_shapes import Architecture, quantized_bytes
from qalign.recipe import LoraSpec, Recipe, TrainSpec

GiB = 2**30
MiB = 2**20
CUDA_CONTEXT = 450 * MiB  # CUDA runtime, cuBLAS workspace and kernels: typically 300-600 MiB
ALLOCATOR_SHARE = 0.08  # the caching allocator's fragmentation, as a share of what changes every step
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def lora_shapes(arch: Architecture, lora: LoraSpec) -> list[tuple[int, int]]:
    """(in, out) of every linear layer that gets an adapter."""
    return [shape for shapes in _adapted(arch, lora).values() for shape in shapes]


def _adapted(arch: Architecture, lora: LoraSpec) -> dict[str, list[tuple[int, int]]]:
    if lora.target_modules == "all-linear":
        return arch.linears
    return {name: arch.linears[name] for name in lora.target_modules if name in arch.linears}


@dataclass
class Lengths:
    """What the data says about sequence lengths (tokens, prompt included)."""

    longest: int | None = None
    longest_trained: int | None = None
    """Most trained (loss) positions in one example; for DPO, of one side."""
    longest_pair: int | None = None
    """DPO: the longest row of collate_dpo's layout (prompt once, then both responses)."""
    longest_pair_trained: int | None = None
    """DPO: most trained positions in one such row (both sides)."""
    lengths: list[int] = field(default_factory=list)
    note: str = ""
    rows: list[tuple[int, int]] = field(default_factory=list)
    """(tokens, trained positions) of each example's row in the padded layout (DPO: collate_dpo's pair row):
    what a packed micro-batch lays end to end."""


@dataclass
class Plan:
    stage: str
    target: str  # "cuda" or "cpu"
    components: dict[str, int]
    base_detail: dict[str, int]
    batch_size: int
    rows: int
    seq_len: int
    trained_positions: int
    gradient_checkpointing: bool
    activations_by_checkpointing: dict[str, int]
    assumptions: list[str]
    activation_offloading: bool = False
    host_offload_bytes: int = 0
    """What activation offloading keeps in pinned host memory at its most (beside the GPU's total)."""
    limit: int | None = None
    suggestions: list[str] = field(default_factory=list)
    suggestion_note: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.limit is None else self.total_bytes <= self.limit

    def to_json(self) -> dict:
        return {
            "stage": self.stage,
            "target": self.target,
            "total_bytes": self.total_bytes,
            "limit_bytes": self.limit,
            "fits": self.fits,
            "components": self.components,
            "base_weights_detail": self.base_detail,
            "activations_by_checkpointing": self.activations_by_checkpointing,
            "batch_size": self.batch_size,
            "sequence_length": self.seq_len,
            "trained_positions_per_micro_batch": self.trained_positions,
            "gradient_checkpointing": self.gradient_checkpointing,
            "activation_offloading": self.activation_offloading,
            "host_offload_bytes": self.host_offload_bytes,
            "suggestions": self.suggestions,
            "suggestion_note": self.suggestion_note,
            "assumptions": self.assumptions,
        }


def estimate(
    arch: Architecture,
    recipe: Recipe,
    stage: str,
    lengths: Lengths,
    target: str,
    limit: int | None = None,
    *,
    batch_size: int | None = None,
    gradient_checkpointing: bool | None = None,
    max_length: int | None = None,
    rank: int | None = None,
    activation_offloading: bool | None = None,
) -> Plan:
    """Peak memory of one training step of `stage`; the keyword arguments stand in for recipe values."""
    spec: TrainSpec = getattr(recipe, stage)
    model = recipe.model
    from qalign.model import dtype_name

    dtype = dtype_name(model.compute_dtype, target)
    a = DTYPE_BYTES[dtype]
    assumptions = [f"{arch.source}; compute dtype {dtype}"]
    batch = batch_size or (spec.batch_size if isinstance(spec.batch_size, int) else 1)
    checkpointing = (
        gradient_checkpointing
        if gradient_checkpointing is not None
        else (spec.gradient_checkpointing if isinstance(spec.gradient_checkpointing, bool) else True)
    )
    offload = (
        activation_offloading if activation_offloading is not None else spec.activation_offloading is True
    )
    offload = offload and target == "cuda"  # on a CPU, activations already are in host memory
    max_len = max_length or spec.max_length
    r = rank or recipe.lora.r

    # -- the frozen base ------------------------------------------------------------------------------
    detail = {"quantized_weights": 0, "quantization_constants": 0}
    for numel in arch.quantized:
        packed, constants = quantized_bytes(numel, model.double_quant)
        detail["quantized_weights"] += packed
        detail["quantization_constants"] += constants
    for name, numel in arch.unquantized.items():
        detail[name] = numel * a
    detail["buffers"] = arch.buffers_bytes + arch.buffers_compute_elems * a
    components = {"base_weights": sum(detail.values())}

    # -- the adapter, its gradients and AdamW's two moments (all fp32, as peft keeps adapters) ----------
    shapes = lora_shapes(arch, recipe.lora)
    lora_elems = sum(r * (i + o) for i, o in shapes)
    components["lora_weights"] = lora_elems * 4
    components["lora_gradients"] = lora_elems * 4
    components["optimizer_states"] = lora_elems * 8 + len(shapes) * 2 * 4  # + a step counter per tensor

    # -- activations ----------------------------------------------------------------------------------
    from qalign.packing import packs

    attn = model.attn_implementation or arch.attention
    packing = packs(arch, recipe, stage, lengths, batch)[0]
    pair_rows = stage == "dpo" and _takes_pair_rows(arch, attn, lengths, max_len)
    pair_masks = 0
    if packing:
        # One row: the micro-batch's longest examples end to end; attention per example (packing.py), so no
        # mask for SFT and for DPO only each pair's own [1, 1, n, n] mask.
        rows = 1
        longest = 2 * max_len if stage == "dpo" else max_len
        sizes = sorted(lengths.rows, reverse=True)[:batch] or [(longest, longest - 1)] * batch
        seq = sum(n for n, _ in sizes)
        trained = min(seq - 1, sum(t for _, t in sizes))
        # forward_kwargs pads each pair's mask once, to its segment's attention length.
        blocks = [_attention_length(n, target, dtype) for n, _ in sizes]
        pair_masks = sum(b * b for b in blocks) * a if stage == "dpo" else 0
        what = f"packed: the {len(sizes)} longest {'pair rows' if stage == 'dpo' else 'examples'} end to end"
        what += f"; {lengths.note}" if lengths.note else ""
    elif pair_rows:
        # collate_dpo: one row per pair, the shared prompt once, both responses trained.
        rows = batch
        seq = min(lengths.longest_pair, 2 * max_len) if lengths.longest_pair else 2 * max_len
        both = lengths.longest_pair_trained
        trained = min(seq - 1, both) if both else seq - 1
        what = lengths.note or "2 x max_length"
    else:
        rows = batch * (2 if stage == "dpo" else 1)
        seq = min(max_len, lengths.longest) if lengths.longest else max_len
        trained = min(seq - 1, lengths.longest_trained) if lengths.longest_trained else seq - 1
        what = lengths.note or "max_length"
    tokens = rows * seq
    positions = rows * trained
    assumptions.append(
        f"{rows} rows of {seq} tokens per micro-batch ({what}), {trained} trained positions per row"
    )
    # A mask reaches attention for DPO's pair rows (pair_attention, in the compute dtype) and for padded rows
    # (a bool mask; assumed whenever a batch has several rows). With one, sdpa gets keys and values repeated
    # to every query head (transformers only uses sdpa's own GQA without a mask), and keeps the mask.
    # Flash-attention unpads instead; eager always repeats them.
    masked = (pair_rows or rows > 1) and attn != "flash_attention_2"
    mask = rows * seq * seq * (a if pair_rows else 1) if masked else 0
    if packing:
        masked, mask = stage == "dpo", pair_masks
    # DPO turns dropout off (runner.disable_dropout); a dropout of 0 saves no copies.
    dropout = recipe.lora.dropout > 0 and stage != "dpo"
    # On a CPU each adapter on a 4-bit base runs as one node (qalign/lora.py) that keeps its shared input.
    fused = target == "cpu" and model.quantization != "none" and dtype in ("bf16", "fp32")
    # On a CPU, qalign/rmsnorm.py's node keeps a Llama-style norm's input as it is, not an fp32 copy.
    norm_input = DTYPE_BYTES[dtype] if target == "cpu" and arch.norm_node else 4
    per_layer = _layer_bytes_per_token(
        arch, recipe.lora, dtype, r, dropout, masked or attn == "eager", fused, norm_input
    )
    attention = _attention_scores_bytes(arch, attn, rows, seq, a)
    if packing:
        # Each segment's attention keeps its own (blocked) output; the output projection reads their
        # concatenation, a tensor of its own.
        attention += _attention_copies(arch, a, masked, seq, sum(blocks) - seq)
    elif attn == "sdpa":
        size = _attention_length(seq, target, dtype)
        if size > seq:
            # packing._blocked_sdpa: the row's padded copies, its mask's included, and the output projection's
            # input no longer the tensor attention keeps.
            padded = mask * size * size // (seq * seq) if masked else 0
            attention += _attention_copies(arch, a, masked, rows * seq, rows * (size - seq)) + padded
    saved_layers = arch.layers * (per_layer * tokens + attention) + mask
    inputs_only = arch.layers * arch.hidden * a * tokens + mask  # what checkpointing keeps of each layer
    # ids, labels and positions (int64) live all step; the final norm's input (as it keeps it) and the
    # decoder's output until the backward reaches them, before any layer's.
    ids = 24 * tokens
    final = (norm_input * arch.hidden + arch.hidden * a) * tokens
    logits = _loss_head_bytes(arch, positions, a)
    head = ids + final + logits
    # A layer's backward holds, besides its saved tensors, the gradient coming down the residual stream and
    # one MLP-wide gradient at a time: each node's saved tensors are freed as its backward runs, so the
    # gate/up gradients replace the tensors they were computed from (measured on CPU, plan_accuracy.py).
    # With checkpointing the layer is first recomputed, so its saved tensors are alive only then.
    layer_backward = (arch.intermediate + arch.hidden) * a * tokens
    layer_peak = per_layer * tokens + attention + layer_backward
    host = 0
    if offload:
        # qalign/offload.py: saved tensors wait in host memory, so the GPU holds one layer's at a time (the
        # layer being computed, or recomputed and differentiated). With checkpointing the mask is a keyword
        # argument, never saved; without, every layer's attention saves the same mask, copied once.
        # What the head saves is offloaded too; counting it on the GPU keeps the plan on the safe side.
        host = (arch.layers - 1) * (
            arch.hidden * a * tokens if checkpointing else per_layer * tokens + attention
        )
        inputs_only = arch.hidden * a * tokens + mask
        saved_layers = per_layer * tokens + attention + mask
        assumptions.append(
            f"activation offloading: {host / GiB:.2f} GiB of saved activations wait in pinned host memory"
        )
    with_ckpt = max(inputs_only + head, inputs_only + ids + layer_peak)
    without = max(saved_layers + head, saved_layers + ids + layer_backward)
    by_ckpt = {"on": with_ckpt, "off": without}
    activations = with_ckpt if checkpointing else without
    components["activations"] = activations - logits
    components["logits"] = logits
    # bitsandbytes dequantizes one weight matrix at a time to multiply with it.
    components["dequantized_weight"] = max(arch.quantized, default=0) * a

    if stage == "dpo":
        reference = 0
        live = recipe.dpo is not None and recipe.dpo.reference == "live" and not recipe.dpo.reference_free
        if live and _has_start_adapter(recipe):
            reference = lora_elems * 4  # a frozen copy of the starting adapter beside the trained one
        components["dpo_reference"] = reference
        # KTO lays each row out as a pair: its completion, then the mismatched one of the KL estimate (kto.py).
        kto = recipe.dpo is not None and recipe.dpo.loss == "kto"
        sides = "completion and KL-estimate completion" if kto else "chosen and rejected"
        assumptions.append(
            (
                f"{'KTO' if kto else 'DPO'}: the {'rows' if kto else 'pairs'} packed in one row, each with its own "
                "attention mask; "
                if packing
                else f"{'KTO' if kto else 'DPO'}: one row per {'example' if kto else 'pair'} (the prompt once, "
                f"then {sides}, with a [{rows}, 1, {seq}, {seq}] {dtype} attention mask); "
                if pair_rows
                else f"DPO: {sides} as 2 rows per pair in one forward (flash-attention or a "
                "sliding window shorter than the pair cannot take the one-row layout); "
            )
            + (
                f"{recipe.dpo.loss} is reference-free: no reference pass, nothing cached"
                if recipe.dpo is not None and recipe.dpo.reference_free
                else f"reference log-probs cached (4 numbers per {'row' if kto else 'pair'}, in host memory)"
                if recipe.dpo is not None and recipe.dpo.reference == "precompute"
                else "live reference: an extra no-grad forward before each step (not at the peak)"
            )
        )
    if target == "cuda":
        changing = components["activations"] + components["logits"] + components["dequantized_weight"]
        components["allocator_overhead"] = int(ALLOCATOR_SHARE * changing)
        components["cuda_context"] = CUDA_CONTEXT
    else:
        assumptions.append("CPU target: no CUDA context or allocator overhead; excludes Python and libraries")
    return Plan(
        stage=stage,
        target=target,
        components={k: int(v) for k, v in components.items()},
        base_detail=detail,
        batch_size=batch,
        rows=rows,
        seq_len=seq,
        trained_positions=positions,
        gradient_checkpointing=checkpointing,
        activation_offloading=offload,
        host_offload_bytes=int(host),
        activations_by_checkpointing={k: int(v) for k, v in by_ckpt.items()},
        assumptions=assumptions,
        limit=limit,
    )


def _loss_head_bytes(arch: Architecture, positions: int, a: int) -> int:
    """The loss head at its peak, in its forward (qalign/logprobs.py): the trained positions' hidden states
    and their unit gradients ([N, H] each, in the compute dtype), fp32 log-probs and int64 targets, and one
    chunk's logits: two fp32 buffers at once (the logits and their log-softmax, which turns into their
    gradient in place), three with softcapping (the tanh kept for its derivative); below fp32 the head's output
    before its cast and the gradient's cast back are smaller than the second buffer they sit beside."""
    per_position = 2 * arch.hidden * a + 4 + 8
    chunk = min(positions, chunk_tokens(arch.vocab))
    per_logit = 8 + (4 if arch.logit_softcap else 0)
    return positions * per_position + chunk * arch.vocab * per_logit


# Which decoder linears read the same tensor: every adapter on one of them can share it (without dropout).
_ATTENTION_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv"}
_MLP_IN = {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3"}
_MLP_OUT = {"down_proj", "fc2", "w2"}
_ATTENTION_OUT = {"o_proj", "out_proj", "dense"}


def _attention_length(n: int, target: str, dtype: str) -> int:
    import torch

    from qalign.model import DTYPES
    from qalign.packing import attention_length

    return attention_length(n, torch.device(target), DTYPES[dtype])


def _attention_copies(arch: Architecture, a: int, masked: bool, tokens: int, padding: int) -> int:
    """Bytes attention saves beyond the per-token count when its output is not the output projection's input
    (`tokens` of that input) and when it runs on `padding` extra positions (copies of query, key, value and
    output, and the logsumexp of each head)."""
    q = arch.heads * arch.head_dim
    kv = q if masked or arch.kv_heads == arch.heads else arch.kv_heads * arch.head_dim
    return tokens * q * a + padding * (a * (2 * q + 2 * kv) + 4 * arch.heads)


def _layer_bytes_per_token(
    arch: Architecture,
    lora: LoraSpec,
    dtype: str,
    r: int,
    dropout: bool,
    masked: bool,
    fused: bool = False,
    norm_input: int = 4,
) -> float:
    """Bytes one decoder layer saves for backward, per token, counted tensor by tensor for a Llama-style
    layer (other families are close to it). bitsandbytes' 4-bit matmul keeps no input (the weight is
    frozen), so only LoRA, the norms, attention and the MLP's nonlinearity keep anything. Matches the bytes
    torch.autograd.graph.saved_tensors_hooks sees per layer to within 0.1% on three Llama shapes, fp32 and
    bf16, with and without dropout."""
    a = DTYPE_BYTES[dtype]
    h, i = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    layers = max(arch.layers, 1)
    # RMSNorm keeps its input in fp32 (an upcast copy in bf16; in fp32, the residual itself), or as it came
    # (norm_input bytes: qalign/rmsnorm.py's node), and its rsqrt.
    size = arch.norms_per_layer * (norm_input * h + 4)
    # Attention keeps the rotated query, key and value and its output (sdpa; eager adds its scores
    # separately); with a mask the key and value are repeated to every query head first. sdpa also keeps
    # the logsumexp of each head, in fp32.
    kv_kept = q if masked or arch.kv_heads == arch.heads else kv
    size += a * (2 * q + 2 * kv_kept) + 4 * arch.heads
    # The gated MLP keeps the gate and up outputs and the activated gate (the product is only kept below,
    # for an adapter on the down projection).
    size += 3 * a * i
    adapted = _adapted(arch, lora)
    inputs = sum(i_f for shapes in adapted.values() for i_f, _ in shapes) / layers
    count = sum(len(shapes) for shapes in adapted.values()) / layers
    if dtype == "fp16":
        # tune_lora_layers keeps peft's fp32 path for fp16: each adapter multiplies an fp32 copy of its input.
        size += inputs * (4 + (1 if dropout else 0)) + r * count * 4
        return size
    # lora_B keeps lora_A's output.
    size += r * count * a
    if dropout and fused:
        # The fused node keeps the shared input (counted below) and its keep bits, as wide as the dtype.
        size += inputs * a
    elif dropout:
        # Each adapter keeps its own dropped-out input (for lora_A) and the dropout's bool mask.
        return size + inputs * (a + 1)
    # Without dropout lora_A keeps its input, which is what its base layer read: one norm output shared by
    # the attention's input projections, one by the MLP's, the MLP product for the down projection, and the
    # attention output (already kept by attention) for the output projection. Unknown names: their own.
    names = set(adapted)
    size += a * h * (bool(names & _ATTENTION_IN) + bool(names & _MLP_IN)) + a * i * bool(names & _MLP_OUT)
    known = _ATTENTION_IN | _MLP_IN | _MLP_OUT | _ATTENTION_OUT
    size += (
        a * sum(i_f for name, shapes in adapted.items() if name not in known for i_f, _ in shapes) / layers
    )
    return size


def _takes_pair_rows(arch: Architecture, attn: str, lengths: Lengths, max_len: int) -> bool:
    from qalign.dpo import attention_takes_pair_rows

    return attention_takes_pair_rows(attn, arch.sliding_window, lengths.longest_pair or 2 * max_len)


def _attention_scores_bytes(arch: Architecture, attn: str, rows: int, seq: int, a: int) -> int:
    if attn != "eager":
        return 0  # sdpa and flash attention never materialize the scores
    # Eager attention keeps the softmax output in fp32 and, below fp32, its cast to the compute dtype.
    return rows * arch.heads * seq * seq * (4 + (a if a < 4 else 0))


def _has_start_adapter(recipe: Recipe) -> bool:
    from qalign.layout import starting_adapter

    return recipe.dpo is not None and starting_adapter(recipe) is not None


def lengths_of(examples: list, stage: str) -> Lengths:
    """Length statistics of tokenized examples (SftExample or DpoExample)."""
    if not examples:
        return Lengths()
    pairs: list[tuple[int, int]] = []
    if stage == "dpo":
        from qalign.dpo import shared_prefix

        sides = [(e.chosen_ids, e.chosen_labels) for e in examples] + [
            (e.rejected_ids, e.rejected_labels) for e in examples
        ]
        lengths = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
        # collate_dpo's row: the shared prefix once, then the rest of both sides; both sides trained.
        pairs = [
            (
                len(e.chosen_ids) + len(e.rejected_ids) - shared_prefix(e),
                _trained(e.chosen_labels) + _trained(e.rejected_labels),
            )
            for e in examples
        ]
    else:
        sides = [(e.input_ids, e.labels) for e in examples]
        lengths = [len(e.input_ids) for e in examples]
    return Lengths(
        rows=pairs or [(len(ids), _trained(labels)) for ids, labels in sides],
        longest=max(lengths),
        longest_trained=max(_trained(labels) for _, labels in sides),
        longest_pair=max((row for row, _ in pairs), default=None),
        longest_pair_trained=max((trained for _, trained in pairs), default=None),
        lengths=lengths,
        note=f"the longest of {len(examples)} examples",
    )


def _trained(labels: list[int]) -> int:
    return sum(1 for label in labels[1:] if label != IGNORE)
