"""Test tokenizers for the vendors' published chat templates in assets/templates/published: the small test
tokenizer with each model family's special tokens added (and its BOS/EOS, and whether it adds BOS itself), so
a template renders and tokenizes the way it does for the real model, at the scale of a unit test."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache

from conftest import TEMPLATES, TOKENIZER

PUBLISHED = TEMPLATES / "published"
R1_SPECIALS = [
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


@dataclass(frozen=True)
class Family:
    template: str
    end_of_turn: str
    """What closes an assistant turn, as decoded."""
    bos: str | None
    eos: str
    specials: tuple[str, ...] = ()
    plain_added: tuple[str, ...] = ()
    """Tokens the real vocabulary has as single, non-special tokens (Qwen's <think>)."""
    rstrip: tuple[str, ...] = ()
    """Special tokens that swallow the whitespace after them (Phi-3's role markers)."""
    adds_bos: bool = False
    """The tokenizer puts BOS in front of an ordinary encode (Llama, Gemma, Mistral, Phi-3 do)."""
    not_special: tuple[str, ...] = ()
    """Test-tokenizer specials this vocabulary lacks ([INST] is plain text for Mistral v0.1/v0.2)."""
    merges: tuple[tuple[str, str], ...] = ()
    """Extra BPE merges, so a merge the real vocabulary has can straddle a prompt and its reply."""
    system: bool = True
    """The template accepts a system turn."""
    tools: bool = True
    """The template renders tool calls and tool results."""
    generation_eos: tuple[str, ...] = field(default=())
    """generation_config.json's eos_token_id, beyond the tokenizer's EOS."""


FAMILIES = {
    "qwen2.5": Family("qwen2.5", "<|im_end|>", None, "<|im_end|>", ("<|im_start|>", "<|im_end|>"), QWEN_PLAIN[:4]),
    "qwen3": Family("qwen3", "<|im_end|>", None, "<|im_end|>", ("<|im_start|>", "<|im_end|>"), tuple(QWEN_PLAIN)),
    "deepseek-r1-distill": Family(
        "deepseek-r1-distill", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
        tuple(R1_SPECIALS), ("<think>", "</think>"), adds_bos=True,
    ),
    # Renders tool calls only for a null content, and transformers drops null keys before rendering.
    "deepseek-r1-distill-v1": Family(
        "deepseek-r1-distill-v1", "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
        tuple(R1_SPECIALS), ("<think>", "</think>"), adds_bos=True, tools=False,
    ),
    "llama3.1": Family(
        "llama3.1", "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        adds_bos=True, generation_eos=("<|eom_id|>", "<|end_of_text|>"),
    ),
    "llama3.2": Family(
        "llama3.2", "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        adds_bos=True, generation_eos=("<|eom_id|>", "<|end_of_text|>"),
    ),
    "gemma2": Family(
        "gemma2", "<end_of_turn>", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), adds_bos=True,
        system=False, tools=False, generation_eos=("<end_of_turn>",),
    ),
    "gemma3": Family(
        "gemma3", "<end_of_turn>", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), adds_bos=True,
        tools=False, generation_eos=("<end_of_turn>",),
    ),
    "mistral-v0.1": Family(
        "mistral-v0.1", "</s>", "<s>", "</s>", adds_bos=True, not_special=("[INST]", "[/INST]"),
        merges=(("]", "<"),), system=False, tools=False,
    ),
    "mistral-v0.2": Family(
        "mistral-v0.2", "</s>", "<s>", "</s>", adds_bos=True, not_special=("[INST]", "[/INST]"),
        merges=(("]", "<"),), system=False, tools=False,
    ),
    "mistral-v0.3": Family(
        "mistral-v0.3", "</s>", "<s>", "</s>",
        ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        adds_bos=True,
    ),
    "phi3.5": Family(
        "phi3.5", "<|end|>", "<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        rstrip=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), adds_bos=True, tools=False,
        generation_eos=("<|end|>", "<|assistant|>"),
    ),
    "phi4-mini": Family(
        "phi4-mini", "<|end|>", "<|endoftext|>", "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"), tools=False,
        generation_eos=("<|end|>",),
    ),
    "smollm2": Family(
        "smollm2", "<|im_end|>", "<|im_start|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>"), tools=False
    ),
    "olmo2": Family("olmo2", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", tools=False),
}  # fmt: skip


def family_tokenizer(name: str):
    """A fresh tokenizer for the family (callers may change it)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    raw = json.loads(_tokenizer_json())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] not in family.not_special]
    vocab = raw["model"]["vocab"]
    for left, right in family.merges:
        vocab.setdefault(left + right, max(vocab.values()) + 1)
        merges = raw["model"]["merges"]
        merges.insert(0, [left, right] if merges and isinstance(merges[0], list) else f"{left} {right}")
    backend = Tokenizer.from_str(json.dumps(raw))
    if family.adds_bos and family.bos:
        from tokenizers.processors import TemplateProcessing

        backend.add_special_tokens([family.bos])
        backend.post_processor = TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A $B",
            special_tokens=[(family.bos, backend.token_to_id(family.bos))],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos, pad_token="<|pad|>"
    )
    specials = [
        AddedToken(t, rstrip=t in family.rstrip, special=True, normalized=False)
        for t in (*family.specials, *family.generation_eos)
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain_added])
    tokenizer.chat_template = (PUBLISHED / f"{family.template}.jinja").read_text(encoding="utf-8")
    return tokenizer


@cache
def _tokenizer_json() -> str:
    return (TOKENIZER / "tokenizer.json").read_text(encoding="utf-8")
