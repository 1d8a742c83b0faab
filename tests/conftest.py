"""Shared fixtures: tiny random-weight models built from configs (no network), the test tokenizer, and
small datasets and recipes written into a temporary folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"
TOKENIZER = ASSETS / "tokenizer"
TEMPLATES = ASSETS / "templates"

# Small enough to train in seconds on two CPU cores, large enough that every block type is exercised.
_COMMON = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)
ARCHS = {
    "llama": ("LlamaConfig", dict(_COMMON, num_key_value_heads=2, max_position_embeddings=512)),
    "qwen2": ("Qwen2Config", dict(_COMMON, num_key_value_heads=2, max_position_embeddings=512)),
    "mistral": ("MistralConfig", dict(_COMMON, num_key_value_heads=2, max_position_embeddings=512)),
    "gemma2": (
        "Gemma2Config",
        dict(_COMMON, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    ),
    "phi3": ("Phi3Config", dict(_COMMON, num_key_value_heads=2, max_position_embeddings=512)),
    "gpt2": ("GPT2Config", dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=512)),
}


def build_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, kwargs = ARCHS[arch]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = getattr(transformers, config_class)(
        **kwargs,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """tiny_model("llama") -> a folder with config, safetensors weights and the test tokenizer."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch)
        return built[arch]

    return get


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def arithmetic_rows(n: int, start: int = 0) -> list[dict]:
    """A task the tiny model can visibly learn in a few steps: fixed-format answers to sums."""
    rows = []
    for i in range(start, start + n):
        a, b = i % 10, (i * 7) % 10
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."},
                ]
            }
        )
    return rows


def write_recipe(folder: Path, model: Path, **sft_overrides) -> Path:
    """A recipe in `folder` training on data/train.jsonl (written beside it) with small, fast settings."""
    import yaml

    write_jsonl(folder / "data" / "train.jsonl", arithmetic_rows(32))
    write_jsonl(folder / "data" / "eval.jsonl", arithmetic_rows(8, start=100))
    sft = {
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"},
        "max_length": 64,
        "max_steps": 12,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 5e-3,
        "warmup_ratio": 0.0,
        "save_every": 4,
        "eval_every": 6,
        "gradient_checkpointing": True,
    }
    sft.update(sft_overrides)
    recipe = {
        "name": "tiny",
        "output_dir": "runs/tiny",
        "seed": 0,
        "model": {"base": str(model), "quantization": "nf4", "double_quant": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "sft": sft,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def copy_tree():
    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        return dst

    return copy


def preference_rows(n: int, start: int = 0) -> list[dict]:
    """A preference a tiny model learns fast and that generalises to unseen prompts: terse and right over
    hedging and wrong."""
    rows = []
    for i in range(start, start + n):
        a, b = i % 13, (i * 7) % 11
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"The answer is {a + b}.",
                "rejected": f"Hmm, maybe it is {a + b + 1}, I am not sure.",
            }
        )
    return rows


def add_dpo(recipe: Path, **dpo_overrides) -> Path:
    """Add a dpo section (train data/dpo.jsonl, held-out data/dpo_eval.jsonl) to a recipe from write_recipe."""
    import yaml

    folder = recipe.parent
    write_jsonl(folder / "data" / "dpo.jsonl", preference_rows(32))
    write_jsonl(folder / "data" / "dpo_eval.jsonl", preference_rows(8, start=200))
    data = yaml.safe_load(recipe.read_text())
    dpo = {
        "data": {"train": "data/dpo.jsonl", "eval": "data/dpo_eval.jsonl"},
        "max_length": 64,
        "max_steps": 8,
        "batch_size": 4,
        "lr": 5e-3,
        "beta": 0.1,
        "warmup_ratio": 0.0,
        "save_every": 4,
        "eval_every": 4,
    }
    dpo.update(dpo_overrides)
    data["dpo"] = dpo
    recipe.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return recipe


@contextmanager
def saved_storage_bytes() -> Iterator[dict[int, int]]:
    """What autograd saves for backward inside the block: storage address -> bytes, each storage once (a tensor
    saved by several nodes is one allocation)."""
    import torch

    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
