"""The memory planner behind `qalign plan`, `gradient_checkpointing: auto` and `batch_size: auto`.

Pure arithmetic on a model config, the recipe and the data's lengths: no weights are loaded. The parameter
parts are exact (they enumerate the modules of a parameter-free "meta" instance of the architecture and apply
bitsandbytes' storage layout); activations follow what autograd saves in a Llama-style decoder layer with
LoRA, calibrated against allocations measured on CPU (benchmarks/plan_accuracy.py).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from qalign.errors import UserError
from qalign.logprobs import CHUNK_TOKENS
from qalign.recipe import LoraSpec, ModelSpec, Recipe, TrainSpec

GiB = 2**30
MiB = 2**20
BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: the absmax are themselves quantized in blocks of 256
CUDA_CONTEXT = 450 * MiB  # CUDA runtime, cuBLAS workspace and kernels: typically 300-600 MiB
ALLOCATOR_SHARE = 0.08  # the caching allocator's fragmentation, as a share of what changes every step
# Logits-sized fp32 buffers alive at once in the LM head's backward, besides the saved logits: the gradient
# of the gathered target, that of logsumexp, its exp() and their sum. Measured on CPU (plan_accuracy.py).
LOGIT_BACKWARD_BUFFERS = 3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Architecture:
    """What memory depends on, read from a config through a parameter-free instance of the model."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    quantized: list[int]
    """Element counts of the linear layers bitsandbytes stores in 4 bits."""
    unquantized: dict[str, int]
    """Elements kept in compute dtype: embeddings, lm_head (when not tied), norms and biases."""
    buffers_bytes: int
    linears: dict[str, list[tuple[int, int]]]
    """Leaf name (q_proj, ...) -> (in, out) of each decoder linear layer with that name."""
    source: str = ""


def load_config(spec: ModelSpec) -> tuple[object, str]:
    """The model's config: a local folder, the hub cache, or the built-in table (offline). No weights."""
    from transformers import AutoConfig

    from qalign.architectures import known_config, known_ids

    try:
        config = AutoConfig.from_pretrained(
            spec.base, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        return config, f"config of {spec.base}"
    except (OSError, ValueError) as exc:
        known = known_config(spec.base)
        if known is None:
            raise UserError(
                f"model.base: cannot read the config of '{spec.base}' ({str(exc).strip().splitlines()[0]}) and "
                f"it is not in the built-in table ({', '.join(known_ids())})"
            ) from None
    model_type = known.pop("model_type")
    return AutoConfig.for_model(model_type, **known), f"built-in table entry for {spec.base}"


def describe(config: object, spec: ModelSpec, source: str = "") -> Architecture:
    """Count every parameter of the architecture on the meta device, split as bitsandbytes would store it."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    skip = _not_quantized(model) if spec.quantization != "none" else None
    quantized, unquantized, linears = [], {"embeddings": 0, "lm_head": 0, "norms_and_biases": 0}, {}
    quantized_ids = set()
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head or not isinstance(module, torch.nn.Linear | Conv1D):
            continue
        in_f, out_f = (module.weight.shape[0], module.weight.shape[1])
        if isinstance(module, torch.nn.Linear):
            in_f, out_f = out_f, in_f
        linears.setdefault(name.rsplit(".", 1)[-1], []).append((in_f, out_f))
        if skip is not None and name not in skip:
            quantized.append(module.weight.numel())
            quantized_ids.add(id(module.weight))
    embed = model.get_input_embeddings().weight
    seen = set(quantized_ids)
    for param in model.parameters():
        if id(param) in seen:
            continue  # tied weights are one tensor
        seen.add(id(param))
        if param is embed:
            unquantized["embeddings"] += param.numel()
        elif head is not None and param is head.weight:
            unquantized["lm_head"] += param.numel()
        else:
            unquantized["norms_and_biases"] += param.numel()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    heads = config.num_attention_heads
    hidden = config.hidden_size
    return Architecture(
        model_type=config.model_type,
        vocab=config.vocab_size,
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        quantized=quantized,
        unquantized=unquantized,
        buffers_bytes=buffers,
        linears=linears,
        source=source,
    )


def _not_quantized(model: torch.nn.Module) -> set[str]:
    # transformers' own rule for which modules stay in full precision (the LM head, tied weights).
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        return set(get_keys_to_not_convert(model))
    except ImportError:  # pragma: no cover - older transformers
        return {"lm_head"}


def quantized_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed 4-bit weights, quantization constants) of one bitsandbytes Linear4bit weight.

    Without double quant: an fp32 absmax per 64-block and the 16-entry fp32 code. With it: the absmax become
    uint8, plus an fp32 offset, an fp32 absmax per 256 of them and a 256-entry fp32 code."""
    blocks = math.ceil(numel / BLOCK)
    if not double_quant:
        return math.ceil(numel / 2), blocks * 4 + 16 * 4
    return math.ceil(numel / 2), blocks + 4 + math.ceil(blocks / NESTED_BLOCK) * 4 + 16 * 4 + 256 * 4


def lora_shapes(arch: Architecture, lora: LoraSpec) -> list[tuple[int, int]]:
    """(in, out) of every linear layer that gets an adapter."""
    if lora.target_modules == "all-linear":
        return [shape for shapes in arch.linears.values() for shape in shapes]
    return [shape for name in lora.target_modules for shape in arch.linears.get(name, [])]


@dataclass
class Lengths:
    """What the data says about sequence lengths (tokens, prompt included)."""

    longest: int | None = None
    longest_trained: int | None = None
    """Most trained (loss) positions in one example; for DPO, of one side."""
    lengths: list[int] = field(default_factory=list)
    note: str = ""


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
) -> Plan:
    """Peak memory of one training step of `stage`; the keyword arguments stand in for recipe values."""
    spec: TrainSpec = getattr(recipe, stage)
    model = recipe.model
    dtype = model.compute_dtype if model.compute_dtype != "auto" else ("bf16" if target == "cuda" else "fp32")
    a = DTYPE_BYTES[dtype]
    assumptions = [f"{arch.source}; compute dtype {dtype}"]
    batch = batch_size or (spec.batch_size if isinstance(spec.batch_size, int) else 1)
    checkpointing = (
        gradient_checkpointing
        if gradient_checkpointing is not None
        else (spec.gradient_checkpointing if isinstance(spec.gradient_checkpointing, bool) else True)
    )
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
    detail["buffers"] = arch.buffers_bytes
    components = {"base_weights": sum(detail.values())}

    # -- the adapter, its gradients and AdamW's two moments (all fp32, as peft keeps adapters) ----------
    shapes = lora_shapes(arch, recipe.lora)
    lora_elems = sum(r * (i + o) for i, o in shapes)
    components["lora_weights"] = lora_elems * 4
    components["lora_gradients"] = lora_elems * 4
    components["optimizer_states"] = lora_elems * 8 + len(shapes) * 2 * 4  # + a step counter per tensor

    # -- activations ----------------------------------------------------------------------------------
    seq = min(max_len, lengths.longest) if lengths.longest else max_len
    trained = min(seq - 1, lengths.longest_trained) if lengths.longest_trained else seq - 1
    rows = batch * (2 if stage == "dpo" else 1)
    tokens = rows * seq
    positions = rows * trained
    assumptions.append(
        f"{rows} rows of {seq} tokens per micro-batch ({lengths.note or 'max_length'}), "
        f"{trained} trained positions per row"
    )
    # DPO turns dropout off (runner.disable_dropout); a dropout of 0 saves no copies.
    dropout = recipe.lora.dropout > 0 and stage != "dpo"
    per_layer = _layer_bytes_per_token(arch, dropout, shapes, r, a)
    attention = _attention_scores_bytes(arch, model, rows, seq, a)
    saved_layers = arch.layers * (per_layer * tokens + attention)
    inputs_only = arch.layers * arch.hidden * a * tokens
    final = (3 * arch.hidden * a + 4) * tokens + 3 * 8 * tokens  # final norm, embeddings out, ids/mask/labels
    logits_saved = positions * (arch.vocab * 4 + arch.hidden * a + 8)
    chunk = min(positions, CHUNK_TOKENS)
    logits_backward = LOGIT_BACKWARD_BUFFERS * chunk * arch.vocab * 4
    # With checkpointing, the backward of a layer first recomputes it (only then are its activations alive)
    # and holds gradients of about the MLP's width besides (fitted on CPU, as above).
    layer_backward = arch.intermediate * a * tokens
    with_ckpt = max(
        inputs_only + final + logits_saved + logits_backward,
        inputs_only + per_layer * tokens + attention + layer_backward + arch.hidden * a * tokens,
    )
    without = saved_layers + final + logits_saved + logits_backward
    by_ckpt = {"on": with_ckpt, "off": without}
    activations = with_ckpt if checkpointing else without
    logits = logits_saved + logits_backward
    components["activations"] = activations - logits
    components["logits"] = logits
    # bitsandbytes dequantizes one weight matrix at a time to multiply with it.
    components["dequantized_weight"] = max(arch.quantized, default=0) * a

    if stage == "dpo":
        reference = 0
        if recipe.dpo is not None and recipe.dpo.reference == "live" and _has_start_adapter(recipe):
            reference = lora_elems * 4  # a frozen copy of the starting adapter beside the trained one
        components["dpo_reference"] = reference
        assumptions.append(
            "DPO: chosen and rejected in one forward (2 rows per example); "
            + (
                "reference log-probs cached (4 numbers per pair, in host memory)"
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
        activations_by_checkpointing={k: int(v) for k, v in by_ckpt.items()},
        assumptions=assumptions,
        limit=limit,
    )


def _layer_bytes_per_token(
    arch: Architecture, dropout: bool, shapes: list[tuple[int, int]], r: int, a: int
) -> int:
    """Bytes one decoder layer saves for backward, per token (Llama-style: two RMSNorms, rotary attention,
    a gated MLP; other families are close to it)."""
    h, i = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    # Fitted to the per-layer growth of measured peaks on CPU (plan_accuracy.py varies layers at fixed
    # width): the residual stream, both norms' outputs, query/key/value with their rotations, the attention
    # output, and the gated MLP's four intermediate tensors, plus the gradients alive at the peak.
    elems = 2.9 * (h + q) + 2.35 * kv + 4.3 * i
    size = elems * a
    if a < 4:
        size += 2 * h * 4  # RMSNorm upcasts its input to fp32 and keeps it
    layers = max(arch.layers, 1)
    if dropout:
        # Each adapter keeps its own dropped-out copy of its input and the mask (not shared with the base).
        inputs = sum(i_f for i_f, _ in shapes) / layers
        size += inputs * (a + 1) + 0.9 * (h + q) * a
    size += r * len(shapes) / layers * a  # lora_A's output, kept for lora_B
    size += arch.heads * 4  # attention's logsumexp
    return int(size)


def _attention_scores_bytes(arch: Architecture, model: ModelSpec, rows: int, seq: int, a: int) -> int:
    if model.attn_implementation != "eager":
        return 0  # sdpa and flash attention never materialize the scores
    # Eager attention keeps the softmax output in fp32 and its cast to the compute dtype.
    return rows * arch.heads * seq * seq * (4 + a)


def _has_start_adapter(recipe: Recipe) -> bool:
    if recipe.dpo is not None and recipe.dpo.init_adapter is not None:
        return True
    return (recipe.out / "sft" / "adapter" / "adapter_config.json").exists()


def suggest(
    arch: Architecture, recipe: Recipe, stage: str, lengths: Lengths, plan: Plan
) -> tuple[list[str], str]:
    """The smallest change that fits, as `--set` override strings (without the `--set`), and a note."""
    if plan.fits is not False:
        return [], ""
    spec: TrainSpec = getattr(recipe, stage)

    def fits(**kwargs: object) -> Plan | None:
        options = {"batch_size": plan.batch_size, "gradient_checkpointing": plan.gradient_checkpointing}
        options.update(kwargs)
        candidate = estimate(arch, recipe, stage, lengths, plan.target, plan.limit, **options)
        return candidate if candidate.fits else None

    # 1. gradient checkpointing: same results, about a third more compute.
    if not plan.gradient_checkpointing and fits(gradient_checkpointing=True):
        return [f"{stage}.gradient_checkpointing=true"], "same results, about a third slower"
    ckpt = [f"{stage}.gradient_checkpointing=true"] if not plan.gradient_checkpointing else []
    # 2. a smaller micro-batch, with accumulation keeping the effective batch.
    accum = spec.grad_accum
    effective = plan.batch_size * accum
    for smaller in range(plan.batch_size - 1, 0, -1):
        if effective % smaller == 0 and fits(batch_size=smaller, gradient_checkpointing=True):
            return (
                [*ckpt, f"{stage}.batch_size={smaller}", f"{stage}.grad_accum={effective // smaller}"],
                f"same effective batch of {effective}",
            )
    # 3. a shorter max_length, at batch 1 with checkpointing.
    base = [
        *ckpt,
        *([f"{stage}.batch_size=1", f"{stage}.grad_accum={effective}"] if plan.batch_size > 1 else []),
    ]
    length = plan.seq_len
    while length > 16:
        length = int(length * 0.875) // 8 * 8
        if fits(batch_size=1, gradient_checkpointing=True, max_length=length):
            over = sum(1 for n in lengths.lengths if n > length)
            what = "truncated" if spec.overlong == "truncate" else "dropped"
            note = f"{over} of {len(lengths.lengths)} examples would be {what}" if lengths.lengths else ""
            return [*base, f"{stage}.max_length={length}"], note
    # 4. a smaller LoRA rank.
    rank = recipe.lora.r
    while rank > 1:
        rank //= 2
        if fits(batch_size=1, gradient_checkpointing=True, max_length=16, rank=rank):
            return [*base, f"{stage}.max_length=16", f"lora.r={rank}"], "a much smaller run"
    return [], "nothing fits: the base model alone is too large for this memory"


def resolve_auto(
    arch: Architecture,
    recipe: Recipe,
    stage: str,
    lengths: Lengths,
    target: str,
    limit: int | None,
    earlier: dict | None = None,
) -> list[str]:
    """Replace `auto` in the stage's gradient_checkpointing and batch_size, in place; returns what was decided.

    gradient_checkpointing: off when the plan fits `limit` without it (at the recipe's batch size, or 1 when
    that is auto too), else on. batch_size: the largest power of two, up to 64 on a GPU and 8 on a CPU (where
    bigger batches barely speed anything up), whose plan fits. Without a limit: checkpointing on, batch 4.
    Values in `earlier` (what a checkpoint was trained with) win, so a resumed run stays exact."""
    spec: TrainSpec = getattr(recipe, stage)
    earlier = earlier or {}
    cap = 64 if target == "cuda" else 8

    def fits(**options: object) -> bool:
        if limit is None:
            return False
        return bool(estimate(arch, recipe, stage, lengths, target, limit, **options).fits)

    decided = []
    if spec.gradient_checkpointing == "auto":
        value = earlier.get("gradient_checkpointing")
        if not isinstance(value, bool):
            trial = spec.batch_size if isinstance(spec.batch_size, int) else 1
            value = limit is None or not fits(batch_size=trial, gradient_checkpointing=False)
        spec.gradient_checkpointing = value
        decided.append(f"{stage}.gradient_checkpointing auto -> {str(value).lower()}")
    if spec.batch_size == "auto":
        value = earlier.get("batch_size")
        if not isinstance(value, int):
            value = 4 if limit is None else 1
            while limit is not None and value * 2 <= cap and fits(batch_size=value * 2):
                value *= 2
        spec.batch_size = value
        decided.append(f"{stage}.batch_size auto -> {value}")
    return decided


def plan_recipe(recipe: Recipe, stage: str, limit: int | None, progress: object) -> tuple[Plan, list[str]]:
    """`qalign plan`: the plan of one stage, its `auto` values resolved and its suggestions filled in."""
    from qalign.model import load_tokenizer

    config, source = load_config(recipe.model)
    arch = describe(config, recipe.model, source)
    target = "cuda" if limit is not None or torch.cuda.is_available() else "cpu"
    if limit is None and target == "cuda":
        limit = torch.cuda.mem_get_info()[0] + CUDA_CONTEXT
    try:
        from qalign.runner import load_stage_data

        tokenizer = load_tokenizer(recipe.model, progress.warn)  # type: ignore[attr-defined]
        train, _ = load_stage_data(recipe, stage, tokenizer, progress)  # type: ignore[arg-type]
        lengths = lengths_of(train, stage)
    except UserError as exc:
        lengths = Lengths(note=f"max_length: the data could not be read ({exc})")
    decided = resolve_auto(arch, recipe, stage, lengths, target, limit)
    plan = estimate(arch, recipe, stage, lengths, target, limit)
    plan.suggestions, plan.suggestion_note = suggest(arch, recipe, stage, lengths, plan)
    return plan, decided


def parse_size(text: str) -> int:
    """'8GiB', '8GB', '8000MiB', '8G', '12.5 GiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--gpu-memory {text}: expected a size like 8GiB, 8GB, 8000MiB or a number of bytes")
    number, unit = match.groups()
    # 'GB' as printed on GPU boxes and by nvidia-smi means GiB; both spellings are read as binary.
    power = " KMGT".index(unit.upper() or " ")
    value = int(float(number) * 1024**power)
    if value <= 0:
        raise UserError(f"--gpu-memory {text}: must be more than 0")
    return value


def available_ram() -> int:
    """Memory the system can give this process without swapping (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def lengths_of(examples: list, stage: str) -> Lengths:
    """Length statistics of tokenized examples (SftExample or DpoExample)."""
    from qalign.chat_template import IGNORE

    if not examples:
        return Lengths()
    if stage == "dpo":
        sides = [(e.chosen_ids, e.chosen_labels) for e in examples] + [
            (e.rejected_ids, e.rejected_labels) for e in examples
        ]
        lengths = [max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples]
    else:
        sides = [(e.input_ids, e.labels) for e in examples]
        lengths = [len(e.input_ids) for e in examples]
    trained = max(sum(1 for label in labels[1:] if label != IGNORE) for _, labels in sides)
    return Lengths(
        longest=max(lengths),
        longest_trained=trained,
        lengths=lengths,
        note=f"the longest of {len(examples)} examples",
    )
