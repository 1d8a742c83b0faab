"""The tokenizer as llama.cpp reads it from a GGUF file: tokens, types, merges, special ids, chat template.

llama.cpp does not run the Hugging Face tokenizer; it re-implements a fixed set of pre-tokenizers (the regex
that splits text before BPE) and picks one by the name stored in `tokenizer.ggml.pre`. A wrong name gives a
model that loads and then tokenizes differently from training, so the name is chosen from what the tokenizer as
transformers loads it actually does, and anything that matches none of the known ones is refused. SentencePiece
style tokenizers (byte-fallback BPE) go to llama.cpp's own SentencePiece tokenizer instead, which needs scores
rather than merges.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qalign.errors import UserError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of the pre-tokenizers llama.cpp implements, as they appear in tokenizer.json files.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_SPLIT_REGEXES = {
    # Llama 3.x
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2 / Qwen2.5 / Qwen3: as Llama 3 but one digit per piece.
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    _GPT2_REGEX: "gpt-2",
}
KNOWN_PRE = "gpt-2 (GPT-2 byte-level), llama-bpe (Llama 3), qwen2 (Qwen2/2.5/3), smollm (SmolLM)"


@dataclass
class Vocab:
    pre: str | None  # None: SentencePiece style, which llama.cpp does not pre-tokenize
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    add_space_prefix: bool = False
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/eot/padding/unknown -> id
    add_bos: bool = False
    chat_template: str | None = None
    stop_words: list[str] = field(default_factory=list)


def _is_byte_level(step: dict[str, Any], use_regex: bool) -> bool:
    return (
        step.get("type") == "ByteLevel"
        and bool(step.get("use_regex", True)) == use_regex
        and not step.get("add_prefix_space", False)
    )


def _split_regex(step: dict[str, Any]) -> str | None:
    if step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert"):
        return None
    pattern = step.get("pattern", {})
    return pattern.get("Regex")


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer that splits text exactly as this tokenizer (its JSON form) does, or a
    UserError."""
    normalizer = spec.get("normalizer")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    # Qwen's NFC normalizer changes nothing for already-composed text, which is what llama.cpp assumes.
    normalizer_ok = normalizer is None or normalizer.get("type") == "NFC"
    name: str | None = None
    if len(steps) == 1 and _is_byte_level(steps[0], use_regex=True):
        name = "gpt-2"
    elif len(steps) == 2 and _is_byte_level(steps[1], use_regex=False):
        name = _SPLIT_REGEXES.get(_split_regex(steps[0]) or "")
    elif (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _is_byte_level(steps[1], use_regex=True)
    ):
        name = "smollm"
    if name is None or not normalizer_ok or (name == "qwen2") != (normalizer is not None):
        raise UserError(
            "the tokenizer's pre-tokenizer "
            f"({json.dumps(pre)[:200]}, normalizer {json.dumps(normalizer)[:80]}) matches none that llama.cpp "
            f"implements, so the GGUF file would tokenize differently from training; supported: {KNOWN_PRE}"
        )
    return name


def sentencepiece_space_prefix(spec: dict[str, Any]) -> bool | None:
    """For a byte-fallback BPE tokenizer (SentencePiece converted: Llama 2, Mistral, Gemma), whether it puts
    "▁" before the text, as llama.cpp's `llama` tokenizer can; None for a layout llama.cpp cannot reproduce."""
    normalizer = spec.get("normalizer") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    steps = [step for step in steps if step]
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    if not pre:
        if steps == [{"type": "Prepend", "prepend": "▁"}, spaces]:
            return True
        if steps == [spaces]:
            return False
        return None
    # Splitting at each "▁" (Metaspace's default) keeps merges inside words; llama.cpp never splits.
    if (
        not steps
        and pre.get("type") == "Metaspace"
        and pre.get("replacement") == "▁"
        and pre.get("split") is False
    ):
        return pre.get("prepend_scheme", "always") != "never"
    return None


def _merge_strings(merges: list[Any]) -> list[str]:
    # tokenizers writes merges either as "a b" strings or, in newer files, as [a, b] pairs.
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def read_vocab(model_dir: Path, vocab_size: int) -> Vocab:
    """The tokenizer of ``model_dir`` (byte-level or SentencePiece-style BPE) laid out for GGUF, ``vocab_size``
    entries long (the embedding's row count, which may exceed the tokenizer's)."""
    from transformers import AutoTokenizer

    from qalign.chat_template import end_of_turn_id

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"{model_dir}: a tokenizer without a tokenizers-library backend (tokenizer.json); GGUF export "
            "reads BPE tokenizers from their tokenizers-library form"
        )
    # The tokenizer as loaded, not tokenizer.json as saved: transformers' class for the model type may replace
    # the saved pre-tokenizer (Qwen2Tokenizer splits digits one by one whatever the file says).
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(
            f"{model_dir}: a {model.get('type')} tokenizer; GGUF export supports BPE tokenizers, byte-level "
            "(GPT-2, Llama 3, Qwen style) or SentencePiece style with byte fallback (Llama 2, Mistral, Gemma)"
        )
    sentencepiece = bool(model.get("byte_fallback"))
    space_prefix = sentencepiece_space_prefix(spec) if sentencepiece else False
    if space_prefix is None:
        raise UserError(
            f"{model_dir}: a byte-fallback BPE tokenizer whose normalizer/pre-tokenizer "
            f"({json.dumps(spec.get('normalizer'))[:120]}, {json.dumps(spec.get('pre_tokenizer'))[:120]}) "
            "llama.cpp's SentencePiece tokenizer cannot reproduce"
        )
    pre = None if sentencepiece else pre_tokenizer_name(spec)

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(by_id, NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = _merge_strings(model.get("merges", []))
    scores: list[float] | None = None
    if sentencepiece:
        for token_id, text in by_id.items():
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types[token_id] = BYTE
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = UNKNOWN
        # llama.cpp merges the adjacent pair whose joined token scores highest; scoring each token by how early
        # the first merge producing it comes makes that the order the BPE merges apply in.
        rank: dict[str, int] = {}
        for i, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), i)
        scores = [-float(rank.get(by_id.get(i, ""), len(merges))) for i in range(vocab_size)]
    if max(by_id) >= vocab_size:
        raise UserError(f"{model_dir}: token id {max(by_id)} is beyond the model's {vocab_size} embeddings")
    tokens, token_types = [], []
    for i in range(vocab_size):
        # Embedding rows no token maps to (vocabularies padded to a multiple of 64 or 128) still need a name.
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, UNUSED))

    special: dict[str, int] = {}
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("padding", tokenizer.pad_token_id),
        ("unknown", tokenizer.unk_token_id),
        ("eot", end_of_turn_id(tokenizer) if tokenizer.chat_template else None),
    ):
        if value is not None:
            special[key] = int(value)
    stops = [tokens[special[k]] for k in ("eos", "eot") if k in special]
    return Vocab(
        pre=pre,
        tokens=tokens,
        types=token_types,
        merges=[] if sentencepiece else merges,
        scores=scores,
        add_space_prefix=space_prefix,
        special=special,
        add_bos=_adds_bos(tokenizer),
        chat_template=tokenizer.chat_template or None,
        stop_words=list(dict.fromkeys(stops)),
    )


def write_vocab(writer: Any, vocab: Vocab) -> None:
    if vocab.pre is None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(vocab.add_space_prefix)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "padding": writer.add_pad_token_id,
        "unknown": writer.add_unk_token_id,
        "eot": writer.add_eot_token_id,
    }
    for key, token_id in vocab.special.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
