"""Render a conversation through a chat template and decide which tokens are trained.

The trained-token mask comes out of the same function that renders the chat (one source of truth). It is
derived from the template's own output, rendering the conversation prefix by prefix and diffing the text,
so it is right for any template, with or without `{% generation %}` markers: for each assistant turn i,

    render(messages[:i], add_generation_prompt=True)   ends where the assistant's tokens start
    render(messages[:i + 1])                            ends where they stop (end-of-turn token included)

The text is then tokenized once, as a whole, and a token is trained when its characters fall in such a
span; tokenizing once keeps the ids identical to what the model sees at inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from qalign.errors import UserError

IGNORE = -100

# For bases that ship no template. ChatML is what most open chat models use; on a base model whose vocabulary
# lacks <|im_start|>/<|im_end|> the markers are spelled out in ordinary tokens and an EOS is appended to the
# final turn, so the model still learns to stop.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    """input_ids where trained, IGNORE elsewhere (aligned with input_ids; the shift happens in the loss)."""
    eos_appended: bool = False
    """The final assistant turn ended in no special token, so the tokenizer's EOS was added and trained."""
    turns_unmasked: int = 0
    """Assistant turns left untrained because the template renders history differently from a final turn."""
    text: str = ""


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False
) -> str:
    """The template's text for these messages; template errors become UserError (caller adds the row)."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise UserError(f"the chat template refused this conversation: {exc}") from None


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], last_turn_only: bool = False
) -> Rendered:
    """Token ids and labels for one conversation: every assistant turn is trained (only the final one with
    `last_turn_only`, as preference pairs need), nothing else."""
    full = render(tokenizer, messages)
    spans, unmasked = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (last_turn_only and i != len(messages) - 1):
            continue
        start_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        turn_text = render(tokenizer, messages[: i + 1])
        if not (turn_text.startswith(start_text) and full.startswith(turn_text)):
            # Templates that rewrite history (e.g. drop reasoning from earlier turns) have no stable span for
            # this turn; training on it would teach text the model never sees at inference.
            unmasked += 1
            continue
        end = len(turn_text)
        # Whitespace after the end-of-turn token is never generated (decoding stops at that token).
        while end > len(start_text) and turn_text[end - 1].isspace():
            end -= 1
        spans.append((len(start_text), end))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    labels = [IGNORE] * len(ids)
    for j, (lo, hi) in enumerate(encoding["offset_mapping"]):
        if hi > lo and any(lo < b and hi > a for a, b in spans):
            labels[j] = ids[j]

    ids, labels = _one_bos(tokenizer, ids, labels)
    eos_appended = False
    trained = [j for j, label in enumerate(labels) if label != IGNORE]
    if trained and spans and spans[-1][1] >= len(full.rstrip()):
        last = trained[-1]
        if ids[last] not in set(tokenizer.all_special_ids) and tokenizer.eos_token_id is not None:
            ids.insert(last + 1, tokenizer.eos_token_id)
            labels.insert(last + 1, tokenizer.eos_token_id)
            eos_appended = True
    return Rendered(ids, labels, eos_appended, unmasked, full)


def _one_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> tuple[list, list]:
    """Exactly one BOS where the model expects one: templates that print it and tokenizers that add it
    would otherwise stack two, which quietly hurts training."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids, labels
    while len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids, labels = ids[1:], labels[1:]
    if ids and ids[0] != bos and _tokenizer_adds_bos(tokenizer):
        ids, labels = [bos, *ids], [IGNORE, *labels]
    return ids, labels


def _tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == tokenizer.bos_token_id


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token that closes an assistant turn in this template (e.g. <|im_end|>, <|eot_id|>), which
    generation must stop at; None when the template ends turns with plain text."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = render_conversation(tokenizer, probe)
    trained = [t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label != IGNORE]
    if trained and not rendered.eos_appended and trained[-1] in set(tokenizer.all_special_ids):
        return trained[-1]
    return None


def describe_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """One line on how trained tokens are found, for the start of a run and for `validate`."""
    template = tokenizer.chat_template or ""
    marked = re.search(r"{%-?\s*generation\s*-?%}", template) is not None
    end = end_of_turn_id(tokenizer)
    closing = (
        f"assistant turns end with {tokenizer.convert_ids_to_tokens(end)!r}"
        if end is not None
        else ("assistant turns end without a special token (EOS is appended to final turns)")
    )
    how = "has {% generation %} markers" if marked else "has no {% generation %} markers"
    return f"chat template {how}; trained tokens found by rendering prefixes; {closing}"
