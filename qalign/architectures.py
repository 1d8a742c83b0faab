"""Configs of popular base models, so `qalign plan` works for a hub id that is neither a local folder nor in
the hub cache (offline). Only the numbers memory depends on; everything else takes the architecture's
defaults. Keyed by lower-case hub id; the -Instruct variant shares its base model's shapes."""

from __future__ import annotations

_QWEN25 = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True)
_LLAMA32 = dict(model_type="llama", vocab_size=128256, tie_word_embeddings=True)
_SMOLLM2 = dict(model_type="llama", vocab_size=49152, tie_word_embeddings=True)

_MODELS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": dict(
        _QWEN25,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
    ),
    "Qwen/Qwen2.5-1.5B": dict(
        _QWEN25,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
    "Qwen/Qwen2.5-3B": dict(
        _QWEN25,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
    ),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2",
        vocab_size=152064,
        tie_word_embeddings=False,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
    "meta-llama/Llama-3.2-1B": dict(
        _LLAMA32,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    ),
    "meta-llama/Llama-3.2-3B": dict(
        _LLAMA32,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama",
        vocab_size=128256,
        tie_word_embeddings=False,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "mistralai/Mistral-7B-v0.3": dict(
        model_type="mistral",
        vocab_size=32768,
        tie_word_embeddings=False,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "HuggingFaceTB/SmolLM2-135M": dict(
        _SMOLLM2,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    "HuggingFaceTB/SmolLM2-360M": dict(
        _SMOLLM2,
        hidden_size=960,
        intermediate_size=2560,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
    ),
    "HuggingFaceTB/SmolLM2-1.7B": dict(
        _SMOLLM2,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "google/gemma-2-2b": dict(
        model_type="gemma2",
        vocab_size=256000,
        tie_word_embeddings=True,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
    ),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3",
        vocab_size=32064,
        tie_word_embeddings=False,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}

# Instruction-tuned releases keep their base model's shapes.
_ALIASES = {
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B",
    "Qwen/Qwen2.5-1.5B-Instruct": "Qwen/Qwen2.5-1.5B",
    "Qwen/Qwen2.5-3B-Instruct": "Qwen/Qwen2.5-3B",
    "Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B",
    "meta-llama/Llama-3.2-1B-Instruct": "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B",
    "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "HuggingFaceTB/SmolLM2-360M",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "HuggingFaceTB/SmolLM2-1.7B",
    "google/gemma-2-2b-it": "google/gemma-2-2b",
}

_BY_KEY = {k.lower(): v for k, v in _MODELS.items()} | {
    alias.lower(): _MODELS[target] for alias, target in _ALIASES.items()
}


def known_config(hub_id: str) -> dict | None:
    """The built-in config numbers for a hub id (any case), or None when the table does not have it."""
    found = _BY_KEY.get(hub_id.lower())
    return dict(found) if found is not None else None


def known_ids() -> list[str]:
    return sorted([*_MODELS, *_ALIASES])
