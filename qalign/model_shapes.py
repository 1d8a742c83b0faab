"""What a model is made of, from its config alone: the parts memory depends on, with every parameter counted
as bitsandbytes stores it. No weights are loaded: the architecture is instantiated on the meta device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from qalign.errors import UserError
from qalign.recipe import ModelSpec
from qalign.rmsnorm import looks_like_rms_norm

BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: the absmax are themselves quantized in blocks of 256


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
    """Buffers whose dtype is fixed by the model's code (rotary frequencies are always fp32)."""
    buffers_compute_elems: int
    """Elements of buffers created in the default dtype, which loading sets to the compute dtype (Gemma's
    embedding scale)."""
    linears: dict[str, list[tuple[int, int]]]
    """Leaf name (q_proj, ...) -> (in, out) of each decoder linear layer with that name."""
    norms_per_layer: int = 2
    norm_node: bool = False
    """The layers' norms are Llama-style RMSNorms, which a CPU run computes as one node keeping its input in the
    compute dtype rather than an fp32 copy (qalign/rmsnorm.py)."""
    sliding_window: int | None = None
    attention: str = "sdpa"
    """The attention transformers picks when the recipe names none (eager for models without sdpa: Gemma 2)."""
    source: str = ""
    logit_softcap: bool = False
    """Gemma 2/3's tanh on the logits: one more logits-sized buffer in the loss head."""


def reads_disk_only(spec: ModelSpec) -> bool:
    """For an id the built-in table knows, files on disk (a folder, the hub cache) are used and the network is
    never asked: offline, the hub client retries for most of a minute before it gives up."""
    from qalign.architectures import known_config

    return known_config(spec.base) is not None


def load_config(spec: ModelSpec) -> tuple[object, str]:
    """The model's config: a local folder, the hub cache, or the built-in table (offline). No weights."""
    from transformers import AutoConfig

    from qalign.architectures import known_config, known_ids

    def read(local_only: bool) -> object:
        return AutoConfig.from_pretrained(
            spec.base,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            local_files_only=local_only,
        )

    known = known_config(spec.base)
    try:
        config = read(local_only=reads_disk_only(spec))
        return config, f"config of {spec.base}"
    except (OSError, ValueError) as exc:
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

    # Loading builds the model with its dtype as torch's default, so a buffer made without an explicit dtype
    # takes the compute dtype. Building in bf16 tells those (they come out 2-byte) from fixed ones (fp32).
    # (A copy: from_config records the dtype in the config it is given.)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config), dtype=torch.bfloat16, trust_remote_code=spec.trust_remote_code
        )
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
    follows = [b.dtype == torch.bfloat16 for b in model.buffers()]
    buffers = [b.numel() * b.element_size() for b in model.buffers()]
    layer = next(
        (
            m[0]
            for m in model.modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) == config.num_hidden_layers
        ),
        None,
    )
    norm_modules = (
        [m for m in layer.modules() if "norm" in type(m).__name__.lower()] if layer is not None else []
    )
    norms = len(norm_modules) if layer is not None else 2
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
        buffers_bytes=sum(n for n, f in zip(buffers, follows, strict=True) if not f),
        buffers_compute_elems=sum(n // 2 for n, f in zip(buffers, follows, strict=True) if f),
        linears=linears,
        norms_per_layer=norms,
        norm_node=bool(norm_modules) and all(looks_like_rms_norm(m) for m in norm_modules),
        sliding_window=getattr(config, "sliding_window", None),
        attention=getattr(model.config, "_attn_implementation", None) or "sdpa",
        source=source,
        logit_softcap=bool(getattr(config, "final_logit_softcapping", None)),
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
