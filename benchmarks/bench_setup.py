"""The benchmark's inputs, built once per run: a random-weight model from a config, and generated data in two
workloads. `uniform`: every example the same length, so neither tool gains or loses anything on padding.
`mixed`: prompt and response lengths drawn from a skewed distribution, as real data has them, so padding
(which tokens/s does not count) costs what it costs each tool."""

from __future__ import annotations

import json
import math
import random
import statistics
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


WORKLOADS = ("uniform", "mixed")
# The mixed workload's prompts and responses, in tokens (each word is one): log-normal around a median of
# MIXED_MEDIAN, clipped to MIXED_RANGE. Most are short and a few are long, so a batch pads to its longest.
MIXED_RANGE = (8, 300)
MIXED_MEDIAN = 48
MIXED_SIGMA = 0.9


def mixed_length(rng: random.Random) -> int:
    low, high = MIXED_RANGE
    return min(max(round(rng.lognormvariate(math.log(MIXED_MEDIAN), MIXED_SIGMA)), low), high)


def write_data(
    folder: Path, n: int, prompt_words: int, response_words: int, seed: int = 0, workload: str = "uniform"
) -> dict:
    """sft.jsonl (conversations) and dpo.jsonl (prompt, chosen, rejected): for `uniform` every prompt
    `prompt_words` and every response `response_words` tokens long; for `mixed` each prompt, response, chosen
    and rejected its own length (mixed_length; the word counts are unused). Returns the lengths in words: the
    longest prompt + response (for --max-length) and the spread."""
    from transformers import AutoTokenizer

    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r}: one of {', '.join(WORKLOADS)}")
    words = single_token_words(AutoTokenizer.from_pretrained(TOKENIZER))
    rng = random.Random(seed)

    def length(uniform: int) -> int:
        return uniform if workload == "uniform" else mixed_length(rng)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    sft, dpo, lengths = [], [], []
    for _ in range(n):
        prompt_length = length(prompt_words)
        prompt = text(prompt_length)
        response = length(response_words)
        lengths.append(prompt_length + response)
        sft.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": text(response)},
                ]
            }
        )
        chosen_length, rejected_length = length(response_words), length(response_words)
        lengths += [prompt_length + chosen_length, prompt_length + rejected_length]
        chosen, rejected = text(chosen_length), text(rejected_length)
        while rejected == chosen:
            rejected = text(rejected_length)
        dpo.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sft", sft), ("dpo", dpo)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {
        "workload": workload,
        "min_words": min(lengths),
        "median_words": statistics.median(lengths),
        "max_words": max(lengths),
    }
