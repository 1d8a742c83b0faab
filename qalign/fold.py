"""Folding a LoRA adapter into a 16-bit model through peft, one adapted layer at a time.

peft loads the adapter (LoRA factors, rank/alpha patterns by full module path, DoRA magnitudes, the biases of
`bias: all | lora_only`, `modules_to_save` copies) and does each layer's merge arithmetic, so an adapter made
by any peft-based trainer merges the way peft would run it. What qalign adds: the weight each delta lands on is
the one training multiplied with (read from the checkpoint in its stored precision, quantized and dequantized
when training quantized that layer), and each layer is merged in fp32 and cast once, with only that one layer's
weight and delta in fp32 at a time.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from qalign.errors import UserError
from qalign.progress import Progress

# Config keys under which peft builds something that is not "base weight + delta" and so has no exact plain
# equivalent (activated LoRA only applies after its invocation tokens; replicated layers share one base weight
# that different adapters would each change; parameter targets and trainable tokens are other wrappers this
# module does not fold).
UNMERGEABLE_KEYS = (
    "alora_invocation_tokens",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
)
# Initialisations that leave the base weights as they are; the others (pissa, olora, corda, loftq, lora_ga...)
# train against modified base weights, which merging into the original base would silently ignore.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def check_adapter(adapter: Path) -> dict:
    """The adapter's config, after refusing (one line, naming the key) anything merge cannot fold exactly."""
    config_path = adapter / "adapter_config.json"
    weights_path = adapter / "adapter_model.safetensors"
    if not config_path.exists() or not weights_path.exists():
        raise UserError(
            f"{adapter}: not a LoRA adapter folder (adapter_config.json and adapter_model.safetensors)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type {config.get('peft_type')!r} cannot be merged; only LORA")
    for key in UNMERGEABLE_KEYS:
        if config.get(key):
            raise UserError(f"{config_path}: {key} is set; merge cannot fold it into plain weights exactly")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise UserError(
            f"{config_path}: init_lora_weights {init!r} trains against modified base weights; "
            "convert the adapter to plain LoRA first (peft's path_initial_model_for_weight_conversion)"
        )
    with safe_open(str(weights_path), "pt") as handle:
        keys = handle.keys()
    if not any(".lora_A." in key or ".lora_embedding_A" in key for key in keys):
        raise UserError(f"{adapter}: the adapter holds no LoRA weights")
    return config


def quantized_in_training(model: torch.nn.Module) -> set[str]:
    """Names of the layers transformers' 4-bit loader quantizes in this model (the others, such as the output
    embeddings, trained in 16-bit and must not be round-tripped)."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return {
        name
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D))
        and should_convert_module(name, skip)
    }


def untie_touched_embeddings(model: torch.nn.Module, adapter: Path) -> bool:
    """Give the output embeddings their own weight when the adapter changes either side of a tied pair: the
    adapted model computes with a changed lm_head or embedding alone, which a tied export cannot express."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return False
    names = {m: n for n, m in model.named_modules() if m is inputs or m is outputs}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        keys = handle.keys()
    touched = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}
    if not any(k.startswith(f"{names[m]}.") or k == names[m] for k in touched for m in (inputs, outputs)):
        return False
    outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fold(
    model: torch.nn.Module,
    adapter: Path,
    start_weight: Callable[[str, torch.nn.Module], torch.Tensor],
    progress: Progress,
) -> torch.nn.Module:
    """The model with the adapter merged in. `start_weight(name, layer)` gives the weight a layer's delta is
    added to, in fp32."""
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer

    untie_touched_embeddings(model, adapter)
    config = PeftConfig.from_pretrained(str(adapter))
    config.inference_mode = True
    try:
        peft_model = PeftModel(model, config, "default")
        loaded = peft_model.load_adapter(str(adapter), "default")
    except (ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise UserError(f"{adapter}: does not fit the base model: {str(exc).splitlines()[0]}") from None
    stray = [*loaded.unexpected_keys, *loaded.missing_keys]
    if stray:
        raise UserError(f"{adapter}: adapter weights that match no layer of the base: {', '.join(stray[:3])}")
    layers = [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    with progress.bar("merge", len(layers), 0, unit="layer") as bar:
        for done, (name, layer) in enumerate(layers, start=1):
            base = layer.get_base_layer()
            dtype = base.weight.dtype
            base.weight.data = start_weight(name, base).float()
            bias = getattr(base, "bias", None)  # embeddings have none
            if bias is not None:  # lora_bias adds to it
                bias.data = bias.data.float()
            try:
                layer.merge()
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # e.g. lora_bias, no base bias
                raise UserError(f"{adapter}: cannot merge into {name}: {str(exc).splitlines()[0]}") from None
            base.weight.data = base.weight.data.to(dtype)
            if bias is not None:
                bias.data = bias.data.to(dtype)
            bar.update(done, {})
    # The LoRA layers are merged already (peft would say so); this unwraps them and swaps in the
    # modules_to_save copies.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All adapters are already merged")
        merged = peft_model.merge_and_unload()
    leftover = [n for n, m in merged.named_modules() if type(m).__module__.startswith("peft.")]
    if leftover:
        raise UserError(f"{adapter}: merge left peft layers it cannot fold: {', '.join(leftover[:3])}")
    return merged
