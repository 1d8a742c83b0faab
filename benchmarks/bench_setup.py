"""The benchmark's inputs, built once per run: a random-weight model from a config, and generated data whose
every example has the same length, so neither tool gains or loses anything on padding."""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "assets" / "tokenizer"

# name -> (config class, keyword arguments). "small" is ~25M parameters, "tiny" is for the smoke test; the GPU
# shapes copy real architectures' configs (random weights: speed and memory do not depend on the values).
MODELS = {
    "tiny": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        ),
    ),
    "small": (
        "LlamaConfig",
        dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=8192,
        ),
    ),
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
    ),
}


def build_model(name: str, folder: Path, seed: int = 0) -> dict:
    """Save a random-weight model and the test tokenizer into `folder`; returns its parameter counts."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_class, kwargs = MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = getattr(transformers, config_class)(
        **kwargs,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    embeddings = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "architecture": config_class,
        "parameters": total,
        "non_embedding": total - embeddings,
    }


def single_token_words(tokenizer: object) -> list[str]:
    """Words that are one token both alone and after a space, so n words render as exactly n tokens."""
    words = []
    for piece in tokenizer.get_vocab():
        word = piece[1:]
        if (
            piece.startswith("Ġ")
            and word.isalpha()
            and all(
                len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1
                for text in (word, " " + word)
            )
        ):
            words.append(word)
    return sorted(words)


def write_data(folder: Path, n: int, prompt_words: int, response_words: int, seed: int = 0) -> None:
    """sft.jsonl (conversations) and dpo.jsonl (prompt, chosen, rejected), every example the same length."""
    from transformers import AutoTokenizer

    words = single_token_words(AutoTokenizer.from_pretrained(TOKENIZER))
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    sft, dpo = [], []
    for _ in range(n):
        prompt = text(prompt_words)
        sft.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": text(response_words)},
                ]
            }
        )
        chosen, rejected = text(response_words), text(response_words)
        while rejected == chosen:
            rejected = text(response_words)
        dpo.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft", sft), ("dpo", dpo)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
