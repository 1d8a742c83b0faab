"""Adapters made directly with peft (not by qalign) merge into a model that computes what peft computes.

Each adapter has every trainable tensor moved off its initial value, so a feature merge dropped (a bias, a
modules_to_save copy, a per-layer rank) would show in the logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ARCHS, TOKENIZER

from qalign.adapter import TrainedAs
from qalign.errors import UserError
from qalign.merge import merge_to_folder
from qalign.progress import Progress

PROMPTS = ["<|im_start|>user\nWhat is 2 + 5?<|im_end|>\n<|im_start|>assistant\n", "The answer is 7."]
Q0 = "model.layers.0.self_attn.q_proj"  # a full path: only layer 0's q_proj gets the pattern

CASES = {
    "modules_to_save_lm_head": (
        "llama",
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    ),
    "modules_to_save_embed": ("llama", dict(target_modules=["o_proj"], modules_to_save=["embed_tokens"])),
    "bias_lora_only": ("qwen2", dict(target_modules=["q_proj", "v_proj", "o_proj"], bias="lora_only")),
    "bias_all": ("qwen2", dict(target_modules=["o_proj", "down_proj"], bias="all")),
    "rank_alpha_pattern_by_path": (
        "llama",
        dict(target_modules="all-linear", rank_pattern={Q0: 2}, alpha_pattern={Q0: 64}),
    ),
    "rslora_and_lora_bias": (
        "qwen2",
        dict(target_modules=["q_proj", "v_proj"], use_rslora=True, lora_bias=True),
    ),
    "lora_on_embeddings": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "orthogonal_init": ("llama", dict(target_modules=["q_proj", "up_proj"], init_lora_weights="orthogonal")),
    "mica_init": ("llama", dict(target_modules=["q_proj", "up_proj"], init_lora_weights="mica")),
    "dora": ("llama", dict(target_modules=["q_proj", "k_proj", "gate_proj"], use_dora=True)),
    "tied_lm_head_to_save": ("llama-tied", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "tied_lora_on_lm_head": ("llama-tied", dict(target_modules=["q_proj", "lm_head"])),
    "tied_lora_on_embeddings": ("llama-tied", dict(target_modules=["embed_tokens"])),
}


def build_base(kind: str, folder: Path) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = kind.removesuffix("-tied")
    config_class, kwargs = ARCHS[arch]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = getattr(transformers, config_class)(
        **kwargs,
        tie_word_embeddings=kind.endswith("-tied"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_base(kind, root / kind)
        return built[kind]

    return get


def load(base: Path, quantized: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=quant if quantized else None
    )
    for module in model.modules():
        # Left on, bitsandbytes would switch eval passes to a bf16 CPU kernel.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def make_adapter(base: Path, out: Path, quantized: bool = False, **lora) -> Path:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **lora})
    model = get_peft_model(load(base, quantized), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # factors, biases, magnitudes and module copies alike
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)  # no tokenizer, as peft alone saves it: merge takes the base's
    return out


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoded = [tokenizer(p, return_tensors="pt", add_special_tokens=False) for p in PROMPTS]
    return [model(**ids).logits[0].float() for ids in encoded]


def peft_logits(base: Path, adapter: Path, quantized: bool) -> list[torch.Tensor]:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load(base, quantized), str(adapter)).eval(), base)


def merged_logits(base: Path, adapter: Path, out: Path, base_weights: str) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    trained = TrainedAs(base=str(base), compute_dtype="fp32")
    merge_to_folder(trained, adapter, out, "fp32", base_weights, Progress())
    return logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), out)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_a_peft_adapter_merges_to_what_peft_computes(bases, tmp_path, case):
    """16-bit base (base_weights: original), fp32 throughout: the merge must match peft to fp32 rounding."""
    kind, lora = CASES[case]
    base = bases(kind)
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    expected = peft_logits(base, adapter, quantized=False)
    got = merged_logits(base, adapter, tmp_path / "merged", "original")
    assert max_diff(expected, logits(load(base), base)) > 1e-2  # the adapter really changes the model
    assert max_diff(got, expected) < 1e-4


@pytest.mark.parametrize("dora", [False, True])
def test_nf4_roundtrip_matches_peft_on_the_4bit_base(bases, tmp_path, dora):
    """Trained on the 4-bit base with a LoRA on lm_head (which transformers keeps in 16-bit: it must not be
    round-tripped), a per-path rank, biases and a saved embedding copy; k_proj, o_proj, gate_proj and up_proj
    carry no LoRA but were 4-bit too. With DoRA, the magnitudes were trained against the 4-bit weights' norms."""
    base = bases("qwen2")
    lora = dict(
        target_modules=["q_proj", "v_proj", "down_proj", *([] if dora else ["lm_head"])],
        rank_pattern={Q0: 2},
        bias="lora_only",
        modules_to_save=["embed_tokens"],
        use_dora=dora,
    )
    adapter = make_adapter(base, tmp_path / "adapter", quantized=True, **lora)
    expected = peft_logits(base, adapter, quantized=True)
    got = merged_logits(base, adapter, tmp_path / "merged", "nf4-roundtrip")
    assert max_diff(got, expected) < 1e-4
    assert max_diff(got, peft_logits(base, adapter, quantized=False)) > 1e-3  # the 4-bit base really differs


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("peft_type", "IA3"),
        ("layer_replication", [[0, 2], [1, 2]]),
        ("alora_invocation_tokens", [5, 6]),
        ("trainable_token_indices", [1, 2]),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "lora_ga"),
    ],
)
def test_what_merge_cannot_fold_exactly_is_refused_naming_the_key(bases, tmp_path, key, value):
    import json

    adapter = make_adapter(bases("llama"), tmp_path / "adapter", target_modules=["q_proj"])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    out = tmp_path / "merged"
    with pytest.raises(UserError) as raised:
        merge_to_folder(TrainedAs(base=str(bases("llama"))), adapter, out, "fp32", "original", Progress())
    message = str(raised.value)
    assert key in message and "\n" not in message
    assert not out.exists()


def test_lora_bias_on_a_layer_without_bias_is_refused(bases, tmp_path):
    """peft itself cannot merge it (the bias would have nowhere to go)."""
    adapter = make_adapter(bases("llama"), tmp_path / "adapter", target_modules=["q_proj"], lora_bias=True)
    out = tmp_path / "merged"
    with pytest.raises(UserError, match=r"q_proj.*no bias") as raised:
        merge_to_folder(TrainedAs(base=str(bases("llama"))), adapter, out, "fp32", "original", Progress())
    assert "\n" not in str(raised.value) and not out.exists()


def test_every_file_of_a_merge_output_follows_the_umask(bases, tmp_path):
    """safetensors writes 0600 on its own; with umask 022 the whole export (report included) is 0644."""
    import os
    import stat

    from qalign.merge import merge

    base = bases("llama")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "merged"
    old = os.umask(0o022)
    try:
        merge(
            TrainedAs(base=str(base), compute_dtype="fp32"),
            adapter,
            out,
            "bf16",
            "nf4-roundtrip",
            [],
            Progress(),
        )
    finally:
        os.umask(old)
    found = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in found and "merge_report.json" in found
    assert set(found.values()) == {0o644}, {k: oct(v) for k, v in found.items()}


@pytest.mark.parametrize("quantized", [True, False])
def test_gpt2_conv1d_layers_merge_in_both_orientations(bases, tmp_path, quantized):
    """GPT-2's Conv1D stores weights (in, out): 4-bit training sees them transposed (fan_in_fan_out false),
    16-bit training as they are (fan_in_fan_out true); both must fold onto the 16-bit Conv1D exactly."""
    base = bases("gpt2")
    lora = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=not quantized)
    adapter = make_adapter(base, tmp_path / "adapter", quantized=quantized, **lora)
    expected = peft_logits(base, adapter, quantized=quantized)
    mode = "nf4-roundtrip" if quantized else "original"
    assert max_diff(merged_logits(base, adapter, tmp_path / "merged", mode), expected) < 1e-4
