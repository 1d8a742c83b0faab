"""Render a conversation through a chat template and decide which tokens are trained.

One function, `render_conversation`, returns the token ids and the labels (one source of truth). The whole
conversation is rendered once, as the model sees it; each assistant turn is then located in that text:

    start  where `render(turns before it, add_generation_prompt=True)` stops matching the whole text: what
           the model writes after the generation prompt starts there;
    end    after the text the template closes an assistant turn with (e.g. <|im_end|>, <|end|>, </s>), found
           by rendering a sentinel reply once as the last turn and once followed by a user turn.

So a template that renders earlier turns differently once later turns follow (Qwen3 drops their reasoning) is
trained on each turn as the conversation shows it, and text a template writes only at the very end (Phi's
<|endoftext|>) is never trained. The text is tokenized in pieces cut where each reply starts, so no token
straddles a prompt and its reply, and the prompt part tokenizes as `qalign chat` tokenizes its prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from qalign.errors import UserError
from qalign.template_text import closing_text, prefix_prompt, render_prompt_text, render_spelled

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
    """Assistant turns left untrained because the template does not show their content in the conversation."""
    text: str = ""


@dataclass
class _Span:
    start: int
    end: int
    prompt_tail: str = ""
    """Generation-prompt text the whole render lacks at this turn (DeepSeek-R1's "<think>\\n")."""
    reply: str | None = None
    """The trained text when it is not the rendered text between start and end."""


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = False
) -> str:
    """The template's text for these messages; a refusal becomes a UserError naming the turn (caller adds
    the row)."""
    if add_generation_prompt:
        return render_prompt_text(tokenizer, messages)
    return render_spelled(tokenizer, messages)[1]


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    last_turn_only: bool = False,
    trained_from: int = 0,
) -> Rendered:
    """Token ids and labels for one conversation: every assistant turn from `trained_from` on is trained (only
    the final one with `last_turn_only`, as preference pairs need), nothing else."""
    spelled, full = render_spelled(tokenizer, messages)
    trained = [
        i
        for i, m in enumerate(spelled)
        if m["role"] == "assistant" and i >= trained_from and (not last_turn_only or i == len(spelled) - 1)
    ]
    spans: list[_Span] = []
    unmasked = 0
    closing = closing_text(tokenizer, spelled, trained[-1]) if trained else ""
    floor = 0
    for i in trained:
        span = _locate(tokenizer, spelled, full, i, closing, floor)
        if span is None:
            # The template does not show this turn's content (it hides or rewrites it): training on what it
            # shows instead would teach text no one wrote.
            unmasked += 1
            continue
        spans.append(span)
        floor = span.end

    ids, labels = _tokenize(tokenizer, full, spans)
    ids, labels = _one_bos(tokenizer, ids, labels)
    eos_appended = False
    ends_conversation = spans and spans[-1].end >= len(full.rstrip()) and trained[-1] == len(spelled) - 1
    if spans and not closing and ends_conversation and tokenizer.eos_token_id is not None:
        last = max(j for j, label in enumerate(labels) if label != IGNORE)
        ids.insert(last + 1, tokenizer.eos_token_id)
        labels.insert(last + 1, tokenizer.eos_token_id)
        eos_appended = True
    return Rendered(ids, labels, eos_appended, unmasked, full)


def _locate(
    tokenizer: PreTrainedTokenizerBase, spelled: list[dict], full: str, turn: int, closing: str, floor: int
) -> _Span | None:
    message = spelled[turn]
    prompt = prefix_prompt(tokenizer, spelled, turn)
    start = _common_prefix(prompt, full)
    if start < floor:
        return None
    tail = prompt[start:]
    content = message.get("content") or ""
    visible = content.split("</think>")[-1].strip()
    if closing:
        found = full.find(closing, start)
        if found < 0:
            return None
        end = found + len(closing)
    else:
        # Plain-text turn endings: the reply stops where its content does.
        found = full.find(visible, start) if visible else -1
        if found < 0:
            return None
        end = found + len(visible)
    shown = full[start:end]
    if visible and visible not in shown:
        return None
    if message.get("tool_calls") and not all(
        call["function"]["name"] in shown for call in message["tool_calls"]
    ):
        raise UserError(f"turn {turn} (assistant): this model's chat template does not show tool calls")
    span = _Span(start, end)
    if tail and turn == len(spelled) - 1:
        # The generation prompt ends in text the rendered turn lacks (DeepSeek-R1 opens "<think>\n" there and
        # drops reasoning from every turn it renders). Train as the model is prompted: that prompt, then
        # what follows it in the data (the reasoning, when the content carries it).
        span.prompt_tail = tail
        span.reply = (
            _after_prompt_tail(content, tail) + shown[len(shown) - len(closing) :] if closing else None
        )
        if span.reply is None or not span.reply.strip():
            span.reply = shown
    return span


def _after_prompt_tail(content: str, tail: str) -> str:
    if content.startswith(tail):
        return content[len(tail) :]
    if tail.strip() and content.lstrip().startswith(tail.strip()):
        return content.lstrip()[len(tail.strip()) :].lstrip("\n")
    return content.split("</think>")[-1] if "</think>" in content else content


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _tokenize(tokenizer: PreTrainedTokenizerBase, full: str, spans: list[_Span]) -> tuple[list, list]:
    """Ids and labels, with the text cut where each reply starts: the prompt before it tokenizes on its own,
    as at inference. A token is trained when it overlaps a reply span."""
    pieces: list[tuple[str, int, int]] = []  # (text, trained from, trained to) in the piece's own offsets
    at = 0
    for span in spans:
        if span.reply is not None:
            pieces.append((full[at : span.start] + span.prompt_tail, 0, 0))
            pieces.append((span.reply, 0, len(span.reply)))
            at = span.end
            continue
        if at < span.start:
            pieces.append((full[at : span.start], 0, 0))
        pieces.append((full[span.start : span.end], 0, span.end - span.start))
        at = span.end
    if at < len(full):
        pieces.append((full[at:], 0, 0))
    ids: list[int] = []
    labels: list[int] = []
    merged = _merge_untrained(pieces)
    for text, lo, hi in merged:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
            ids.append(token)
            labels.append(token if b > a and a < hi and b > lo else IGNORE)
    return ids, labels


def _merge_untrained(pieces: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """A reply's piece runs on into the untrained text after it (up to the next reply), so the closing token
    and what follows it tokenize together, as they do at inference."""
    out: list[tuple[str, int, int]] = []
    for text, lo, hi in pieces:
        if out and hi == 0 and out[-1][2] > 0:
            prev_text, prev_lo, prev_hi = out[-1]
            out[-1] = (prev_text + text, prev_lo, prev_hi)
        elif out and hi == 0 and out[-1][2] == 0:
            out[-1] = (out[-1][0] + text, 0, 0)
        else:
            out.append((text, lo, hi))
    return out


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


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """What `qalign chat` feeds the model for `messages`: the generation prompt, with BOS exactly as training
    rows have it, so a trained row's prompt part and a chat prompt are the same tokens."""
    ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)
    ids = list(ids["input_ids"])
    return _one_bos(tokenizer, ids, [IGNORE] * len(ids))[0]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the template closes an assistant turn with (e.g. <|im_end|>, <|eot_id|>, <|end|>),
    which generation must stop at; empty when the template ends turns with plain text."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        spelled, _ = render_spelled(tokenizer, probe)
    except Exception:  # a template that refuses even this exchange: there is nothing to stop on
        return []
    closing = closing_text(tokenizer, spelled, 1)
    if not closing:
        return []
    special = set(tokenizer.all_special_ids) | set(_added_ids(tokenizer))
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"]
    return [t for t in ids if t in special]


def _added_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [t for t, token in tokenizer.added_tokens_decoder.items() if token.special]


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The last special token that closes an assistant turn, or None when the template ends turns with
    plain text."""
    ids = end_of_turn_ids(tokenizer)
    return ids[-1] if ids else None


def describe_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """One line on how trained tokens are found, for the start of a run and for `validate`."""
    template = tokenizer.chat_template or ""
    marked = re.search(r"{%-?\s*generation\s*-?%}", template) is not None
    ends = end_of_turn_ids(tokenizer)
    closing = (
        f"assistant turns end with {''.join(tokenizer.convert_ids_to_tokens(ends))!r}"
        if ends
        else "assistant turns end without a special token (EOS is appended to final turns)"
    )
    how = "has {% generation %} markers" if marked else "has no {% generation %} markers"
    return f"chat template {how}; trained tokens found in the rendered conversation; {closing}"
