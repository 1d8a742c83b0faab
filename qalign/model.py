"""Loading the tokenizer and the 4-bit base, and attaching LoRA adapters to it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from qalign.chat_template import CHATML_TEMPLATE
from qalign.errors import UserError, first_line
from qalign.recipe import LoraSpec, ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    return DTYPES[dtype_name(name, device.type)]


def dtype_name(name: str, target: str) -> str:
    """What `compute_dtype: auto` means on `target` ("cuda" or "cpu"): the one rule for training and planning.
    On a GPU, bf16 where it is supported, else fp16 (T4, V100); a plan for a GPU this machine does not have
    assumes bf16 (every NVIDIA card since the RTX 30 series). On a CPU, bf16 where it multiplies bf16 natively
    (AVX512-BF16 or AMX; emulated bf16 is slower than fp32), else fp32."""
    if name != "auto":
        return name
    if target == "cuda":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            return "fp16"
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower
    than fp32. torch's own kernels must also run at the AVX512 level: with ATEN_CPU_CAPABILITY=avx2 (how an
    AVX2-only CPU is emulated, see benchmarks/bench.py --cpu-kind) its bf16 elementwise ops are emulated too."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


_HUB_UNREACHABLE: dict[str, str | None] = {}


def hub_unreachable(base: str) -> str | None:
    """Why the model hub cannot be reached (None when it can, or when `base` is a local folder, or offline mode
    is on). Asked once per process with a 3-second connect, instead of the hub client's retries that take about
    a minute to fail without a network."""
    import os
    import socket
    from urllib.parse import urlparse

    if Path(base).is_dir() or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return None
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    if endpoint.hostname not in _HUB_UNREACHABLE:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((endpoint.hostname, port), timeout=3).close()
            _HUB_UNREACHABLE[endpoint.hostname] = None
        except OSError as exc:
            _HUB_UNREACHABLE[endpoint.hostname] = (
                f"{constants.ENDPOINT} cannot be reached ({first_line(exc)})"
            )
    return _HUB_UNREACHABLE[endpoint.hostname]


def offline_hint(base: str, why: str) -> str:
    return (
        f"'{base}' is not a local folder and {why}. Use a local folder as model.base, or set HF_HUB_OFFLINE=1 "
        "to use models already in the Hugging Face cache, or connect to a network"
    )


def load_tokenizer(
    spec: ModelSpec, warn: Callable[[str], None], local_files_only: bool = False
) -> PreTrainedTokenizerBase:
    """The base's tokenizer with the chat template training will use, and a pad token."""
    unreachable = None if local_files_only else hub_unreachable(spec.base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.base,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            # Without a network the cache may still hold the model: use it rather than wait on retries.
            local_files_only=local_files_only or unreachable is not None,
        )
    except (OSError, ValueError) as exc:
        if unreachable is not None:
            raise UserError(f"model.base: {offline_hint(spec.base, unreachable)}") from None
        raise UserError(
            f"model.base: cannot load a tokenizer from '{spec.base}': {first_line(exc)}"
        ) from None
    if spec.chat_template is not None:
        tokenizer.chat_template = Path(spec.chat_template).read_text(encoding="utf-8")
    elif not tokenizer.chat_template:
        warn(
            f"{spec.base} has no chat template; using the default ChatML template "
            "(set model.chat_template to a .jinja file to choose another)"
        )
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so any existing token will do; adding one would
        # resize the (frozen, quantized) embeddings.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base(
    spec: ModelSpec, device: torch.device, sharded: bool = False, load_on: torch.device | None = None
) -> torch.nn.Module:
    """The frozen base model: 4-bit NF4/FP4 through bitsandbytes, or plain weights for `none`, for training on
    `device`, loaded onto `load_on` (default: `device`). `sharded`: the packed 4-bit weights are stored in the
    compute dtype, as FSDP wants every weight of a unit in one dtype (bitsandbytes reads the bytes the same
    either way)."""
    load_on = load_on or device
    dtype = compute_dtype(spec.compute_dtype, device)
    quantization = None
    if spec.quantization != "none":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quantization,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8,
        )
    kwargs = {}
    unreachable = hub_unreachable(spec.base)
    if unreachable is not None:
        kwargs["local_files_only"] = True
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.base,
            revision=spec.revision,
            quantization_config=quantization,
            dtype=dtype,
            device_map={
                "": load_on.index if load_on.type == "cuda" and load_on.index is not None else load_on.type
            },
            trust_remote_code=spec.trust_remote_code,
            # Pickle checkpoints can run code when loaded; they need an explicit opt-in (and even then
            # transformers unpickles with weights_only=True).
            use_safetensors=None if spec.allow_pickle else True,
            **kwargs,
        )
    except (OSError, ValueError, SafetensorError) as exc:
        if unreachable is not None:
            raise UserError(f"model.base: {offline_hint(spec.base, unreachable)}") from None
        folder = Path(spec.base)
        pickles = folder.is_dir() and any(p.suffix in (".bin", ".pt") for p in folder.iterdir())
        hint = ""
        if pickles and not spec.allow_pickle and not any(folder.glob("*.safetensors")):
            hint = " (this folder has only pickle weights: convert them to safetensors, or set model.allow_pickle: true)"
        raise UserError(f"model.base: cannot load '{spec.base}': {first_line(exc)}{hint}") from None
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    _no_cpu_inference_packing(model)
    return model


def _no_cpu_inference_packing(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for a bf16 CPU inference kernel the first time a layer runs in eval
    mode, and never unpacks them for training: the kernel has no autograd, so training after an eval pass (or
    after a no-grad reference pass) would backpropagate through it wrongly, and eval itself would run in bf16.
    A model loaded for training therefore keeps the one (differentiable) layout throughout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """`all-linear` for this architecture: every linear layer (4-bit or not) except the LM head."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers when not quantized

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is head or not isinstance(module, torch.nn.Linear | bnb.nn.Linear4bit | Conv1D):
            continue
        names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise UserError("lora.target_modules: 'all-linear' found no linear layers in this model; name them")
    return sorted(names)


def attach_lora(
    model: torch.nn.Module,
    spec: LoraSpec,
    gradient_checkpointing: bool,
    adapter: Path | None = None,
) -> PeftModel:
    """LoRA on the frozen base: fresh, or continued from a saved adapter (trainable either way)."""
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # Non-reentrant checkpointing needs no input that requires grad, so the frozen embeddings stay
            # as they are (no enable_input_require_grads hook).
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    targets = linear_module_names(model) if spec.target_modules == "all-linear" else spec.target_modules
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {first_line(exc)}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, counting each 4-bit weight by the values it holds, not its bytes."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.dtype == torch.uint8 and hasattr(param, "quant_state"):
            n = param.quant_state.shape.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def footprint_bytes(model: torch.nn.Module) -> int:
    """Bytes the loaded model occupies: packed 4-bit weights, their constants, and everything unquantized."""
    seen, size = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            size += _quant_state_bytes(state)
    return size


def _quant_state_bytes(state: object) -> int:
    size = 0
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            size += value.numel() * value.element_size()
    nested = getattr(state, "state2", None)
    return size + (_quant_state_bytes(nested) if nested is not None else 0)
